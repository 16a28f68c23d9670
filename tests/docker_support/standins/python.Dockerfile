# Stand-in for python:3.11-slim-bookworm, built from Debian's packages (bookworm's python3 is 3.11).
# The container tests build it because no image registry is reachable on the test machines; users
# pull the public image. Python is /usr/bin/python3 here, /usr/local/bin/python3 there: the
# Dockerfile only calls `python3`.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
CMD ["python3"]
