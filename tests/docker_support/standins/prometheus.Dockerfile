# Stand-in for prom/prometheus, from Debian's prometheus package: the same entry point, working
# directory and user, so docker-compose.yml's `command:` and mounts work unchanged. (Debian's
# build stores data in /var/lib/prometheus/metrics2 by default, the public image in ./data.)
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown -R nobody:nogroup /prometheus /var/lib/prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
