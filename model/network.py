"""ResMem-Net (PeerJ Comput. Sci. 2021): a ResNet trunk whose every bottleneck output is pooled,
projected to 128 channels and read in order by an LSTM; the last hidden state gives the score.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from . import profiles as _profiles
from .preprocess import IMAGENET_MEAN, IMAGENET_STD
from .profiles import SCORE_KNEES, ProfileSpec, soft_clamp  # noqa: F401  (soft_clamp lives with the profiles)
from .resnet import BLOCKS_PER_STAGE, STAGE_CHANNELS, build_resnet


HEADS = ("lstm", "linear", "readout")


@dataclass(frozen=True)
class ResMemNetConfig:
    backbone: str = "resnet50"
    proj_dim: int = 128  # the paper's 1x1 projection width
    hidden_size: int = 128  # LSTM hidden state
    dropout: float = 0.2
    feature_dropout: float = 0.0  # dropout on the pooled tap vectors themselves (a strong regulariser)
    # "lstm" (paper) | "linear" (ablation: concatenated projections -> linear) | "readout": one
    # linear map of the raw pooled taps, fitted in closed form (ridge; model/training/readout.py)
    head: str = "lstm"
    taps: str = "all"  # "all" bottleneck outputs (paper) | "last" block only (ablation)
    input_scaling: str = "imagenet"  # "imagenet" mean/std | "unit" [0,1]: what the trunk expects
    # A second output fitted to a teacher's scores on unlabelled photos (multi-task training); the
    # score is score_blend * labelled output + (1 - score_blend) * teacher output.
    teacher_output: bool = False
    score_blend: float = 1.0
    # Heads trained side by side from different initialisations and dropout masks on the same
    # pooled features; the score is their mean (the trunk runs once, so this costs little).
    ensemble: int = 1
    # Affine map of the (blended) score onto the labelled scale, fitted on the training images
    # after training: a teacher output brings the teacher's scale along on labelled photos.
    score_scale: float = 1.0
    score_shift: float = 0.0
    # "resmem": the resmem package's memorability-trained branch (model/memory_branch.py) adds
    # its taps after the trunk's; its weights come from the trunk's package file, never embedded.
    branch: str = "none"
    # Domain gate (needs teacher_output): a third output d scores how much a photo looks like the
    # labelled photos (1) rather than the teacher's diverse ones (0). The labelled set's human
    # labels only speak for photos like it, so the calibrated blend is trusted in proportion to
    # g = sigmoid((d - gate_center) / gate_width), and the teacher output takes the rest:
    # score = g * calibrated blend + (1 - g) * teacher output (see blend_outputs).
    domain_gate: bool = False
    gate_center: float = 0.5
    gate_width: float = 0.1
    # Named head output columns and the score profiles over them (model/profiles.py), written by
    # the training module (e.g. outputs lnsim, cdm, teacher, domain.*; profiles lnsim, cdm,
    # general, default). Empty in checkpoints written before named outputs: their columns are
    # labelled, [teacher], [domain] and their profiles follow from the fields above.
    outputs: tuple[str, ...] = ()
    profiles: tuple[ProfileSpec, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "profiles", tuple(ProfileSpec.from_dict(p) for p in self.profiles))
        if self.profiles and not self.outputs:
            raise ValueError("profiles need named outputs")
        if self.outputs:
            _profiles.check_specs(self.outputs, self.profiles)
        if self.backbone not in BLOCKS_PER_STAGE:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose from {sorted(BLOCKS_PER_STAGE)}")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}")
        if self.taps not in ("all", "last"):
            raise ValueError(f"unknown taps {self.taps!r}")
        if self.input_scaling not in ("imagenet", "unit"):
            raise ValueError(f"unknown input scaling {self.input_scaling!r}")
        if not 0.0 <= self.score_blend <= 1.0:
            raise ValueError(f"score_blend must lie in [0, 1], got {self.score_blend}")
        if self.score_blend < 1.0 and not self.teacher_output:
            raise ValueError("score_blend < 1 needs teacher_output = true")
        if not self.score_scale > 0:
            raise ValueError(f"score_scale must be positive (it keeps the ranking), got {self.score_scale}")
        if not isinstance(self.ensemble, int) or self.ensemble < 1:
            raise ValueError(f"ensemble must be a whole number >= 1, got {self.ensemble!r}")
        if self.branch not in ("none", "resmem"):
            raise ValueError(f"unknown branch {self.branch!r}; choose from none, resmem")
        if self.branch == "resmem" and self.backbone != "resnet152":
            raise ValueError("branch 'resmem' reads the resmem package's ResNet-152 logits: backbone must be resnet152")
        if self.head == "readout" and self.ensemble != 1:
            raise ValueError("a readout head is fitted in closed form: ensemble must be 1")
        if self.domain_gate and not (self.teacher_output and self.head == "readout"):
            raise ValueError("domain_gate needs teacher_output = true and the readout head")
        if not self.gate_width > 0:
            raise ValueError(f"gate_width must be positive, got {self.gate_width}")

    @property
    def n_outputs(self) -> int:
        """Head output columns (output_names); without named outputs: labelled, then teacher
        (teacher_output), then domain (domain_gate)."""
        return len(self.output_names)

    @property
    def output_names(self) -> tuple[str, ...]:
        return _profiles.output_names(self)

    def to_dict(self) -> dict:
        return {**asdict(self), "profiles": [p.to_dict() for p in self.profiles]}

    @classmethod
    def from_dict(cls, data: dict) -> "ResMemNetConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)  # __post_init__ turns lists into tuples and profile dicts into ProfileSpecs

    @property
    def trunk_tap_channels(self) -> list[int]:
        """Channels of every bottleneck output, shallow to deep (the last one only for taps="last")."""
        chans = [c for n, c in zip(BLOCKS_PER_STAGE[self.backbone], STAGE_CHANNELS) for _ in range(n)]
        return chans if self.taps == "all" else chans[-1:]

    @property
    def tap_channels(self) -> list[int]:
        """Channels of every tap the head reads: the trunk's, then the memory branch's (if any)."""
        from .memory_branch import BRANCH_TAPS

        extra = [c for _, c in BRANCH_TAPS] if self.branch == "resmem" else []
        return self.trunk_tap_channels + extra


def run_block_fp32(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One block outside any autocast, in fp32: the last stage under mixed precision (scoring and
    Grad-RAM both do this, so their scores agree)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return block(x.float())


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """Spatial mean, accumulated and returned in fp32 even under fp16 autocast: rounding the
    pooled vector to fp16 alone moved scores by ~1e-3 on CUDA."""
    return x.mean(dim=(2, 3), dtype=torch.float32)


class TapHead(nn.Module):
    """Pooled tap vectors -> score. BatchNorm evens out the very different scales of the taps,
    the per-tap linear map is the paper's 1x1 convolution on a 1x1 map."""

    def __init__(self, cfg: ResMemNetConfig):
        super().__init__()
        self.cfg = cfg
        chans = cfg.tap_channels
        self.norms = nn.ModuleList(nn.BatchNorm1d(c) for c in chans)
        self.projections = nn.ModuleList(nn.Linear(c, cfg.proj_dim) for c in chans)
        self.dropout = nn.Dropout(cfg.dropout)
        self.feature_dropout = nn.Dropout(cfg.feature_dropout)
        if cfg.head == "lstm":
            self.lstm = nn.LSTM(cfg.proj_dim, cfg.hidden_size, batch_first=True)
            # He-initialised initial states, learned and fixed at inference (the paper draws them at random).
            self.h0 = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
            self.c0 = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
            nn.init.kaiming_normal_(self.h0.view(1, -1).T)
            nn.init.kaiming_normal_(self.c0.view(1, -1).T)
            # Scale He init down: the LSTM's tanh saturates with unit-variance states.
            with torch.no_grad():
                self.h0.mul_(0.1)
                self.c0.mul_(0.1)
            out_dim = cfg.hidden_size
        else:
            out_dim = cfg.proj_dim * len(chans)
        self.out = nn.Linear(out_dim, cfg.n_outputs)

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        """pooled: one (B, C_i) tensor per tap -> (B,) scores in [0, 1]."""
        return blend_outputs(self.outputs(pooled), self.cfg)

    def member_outputs(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        """(1, B, n_outputs): the training loss is taken per ensemble member."""
        return self.outputs(pooled).unsqueeze(0)

    def outputs(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        """(B, n_outputs) in [0, 1]: column 0 fits the labelled scores, column 1 (if any) the teacher's."""
        if len(pooled) != len(self.projections):
            raise ValueError(f"expected {len(self.projections)} taps, got {len(pooled)}")
        # Feature dropout before the BatchNorm: on LNSIM this beat dropout after it (CV rho 0.550 vs 0.531).
        seq = [self.dropout(proj(norm(self.feature_dropout(p))))
               for p, norm, proj in zip(pooled, self.norms, self.projections)]
        if self.cfg.head == "lstm":
            x = torch.stack(seq, dim=1)  # (B, T, D)
            batch = x.shape[0]
            h0 = self.h0.expand(1, batch, -1).contiguous()
            c0 = self.c0.expand(1, batch, -1).contiguous()
            if x.is_cuda and torch.is_grad_enabled() and not self.training:
                # cuDNN's LSTM cannot backpropagate in eval mode (Grad-RAM needs exactly that).
                feat = self._lstm_unrolled(x, h0[0], c0[0])
            else:
                _, (h_last, _) = self.lstm(x, (h0, c0))
                feat = h_last[-1]
        else:
            feat = torch.cat(seq, dim=1)
        return torch.sigmoid(self.out(self.dropout(feat)))

    def _lstm_unrolled(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """nn.LSTM's recurrence (gate order i, f, g, o) with plain ops; returns the last hidden state."""
        lstm = self.lstm
        w_ih, w_hh = lstm.weight_ih_l0, lstm.weight_hh_l0
        bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
        for t in range(x.shape[1]):
            gates = x[:, t] @ w_ih.T + h @ w_hh.T + bias
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return h

    def split_flat(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """(B, sum C_i) cached features -> per-tap list."""
        return list(torch.split(flat, self.cfg.tap_channels, dim=1))


class TapReadout(nn.Module):
    """Pooled tap vectors -> outputs by one linear map of their concatenation. Training fits it in
    closed form (ridge on standardised taps, model/training/readout.py) and folds the
    standardisation into the weights, so serving is a single matrix product."""

    def __init__(self, cfg: ResMemNetConfig):
        super().__init__()
        self.cfg = cfg
        self.out = nn.Linear(sum(cfg.tap_channels), cfg.n_outputs)
        with torch.no_grad():  # an unfitted readout scores near 0.5, not in the tails of soft_clamp
            self.out.weight.mul_(0.01)
            self.out.bias.fill_(0.5)

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        return blend_outputs(self.outputs(pooled), self.cfg)

    def outputs(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        """(B, n_outputs) on the score scale, unbounded (blend_outputs bounds the final score)."""
        if len(pooled) != len(self.cfg.tap_channels):
            raise ValueError(f"expected {len(self.cfg.tap_channels)} taps, got {len(pooled)}")
        return self.out(torch.cat([p.float() for p in pooled], dim=1))

    def member_outputs(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        return self.outputs(pooled).unsqueeze(0)

    def split_flat(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(flat, self.cfg.tap_channels, dim=1))


def domain_weight(outputs: torch.Tensor, cfg: ResMemNetConfig) -> torch.Tensor:
    """(B, 3) outputs of a gated head -> (B,) g in (0, 1): the weight of the calibrated blend."""
    return torch.sigmoid((outputs[:, 2] - cfg.gate_center) / cfg.gate_width)


def blend_outputs(outputs: torch.Tensor, cfg: ResMemNetConfig) -> torch.Tensor:
    """(B, n_outputs) -> (B,) score of the model: its `default` profile (model/profiles.py), kept in
    [0, 1] by soft_clamp. For a config without named outputs: the labelled output, blended with the
    teacher output if any, then calibrated; with a domain gate, mixed with the teacher output by
    domain_weight."""
    return _profiles.profile_score(outputs, cfg, "default")


# The profiles of checkpoints without named outputs (model/profiles.py, legacy_profiles):
#   default: the checkpoint's own score (blend_outputs);
#   general: the teacher output alone, bounded by soft_clamp: for photos unlike the labelled set;
#   outdoor: the calibrated blend without the domain gate: for photos like the labelled set.
# Models trained on named studies have theirs in ResMemNetConfig.profiles.
PROFILES = _profiles.LEGACY_PROFILES


def available_profiles(cfg: ResMemNetConfig) -> tuple[str, ...]:
    """The profiles a model with this config can score, "default" first."""
    return _profiles.profile_names(cfg)


def check_profile(cfg: ResMemNetConfig, profile: str) -> str:
    """`profile`, or model.errors.InputError (a ValueError) naming the profiles a model with this config has."""
    return _profiles.check_profile(cfg, profile)


def profile_score(outputs: torch.Tensor, cfg: ResMemNetConfig, profile: str = "default") -> torch.Tensor:
    """(B, n_outputs) head outputs -> (B,) scores of one profile; ValueError for a profile this
    model has not got (check_profile)."""
    return _profiles.profile_score(outputs, cfg, profile)


def profile_scores(outputs: torch.Tensor, cfg: ResMemNetConfig) -> torch.Tensor:
    """(B, n_outputs) -> (B, len(available_profiles(cfg))) scores, in that order."""
    return _profiles.profile_scores(outputs, cfg)


class HeadEnsemble(nn.Module):
    """cfg.ensemble TapHeads on the same pooled taps; outputs are the members' mean."""

    def __init__(self, cfg: ResMemNetConfig):
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(TapHead(cfg) for _ in range(cfg.ensemble))

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        return blend_outputs(self.outputs(pooled), self.cfg)

    def outputs(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        return self.member_outputs(pooled).mean(dim=0)

    def member_outputs(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        """(members, B, n_outputs)."""
        return torch.stack([m.outputs(pooled) for m in self.members])

    def split_flat(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return self.members[0].split_flat(flat)


def build_head(cfg: ResMemNetConfig) -> nn.Module:
    if cfg.head == "readout":
        return TapReadout(cfg)
    # One head keeps the plain `head.*` keys of checkpoints written before ensembles existed.
    return TapHead(cfg) if cfg.ensemble == 1 else HeadEnsemble(cfg)


class ResMemNet(nn.Module):
    """Scores images (B, 3, H, W) in [0, 1] (any H, W >= 32) with memorability in [0, 1]."""

    def __init__(self, cfg: ResMemNetConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk = build_resnet(cfg.backbone)
        self.branch = None
        if cfg.branch == "resmem":
            from .memory_branch import MemoryBranch

            self.branch = MemoryBranch()
        self.head = build_head(cfg)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.input_scaling == "imagenet" else ((0, 0, 0), (1, 1, 1))
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.trunk_frozen = False
        # timm-style record of what each tap carries.
        self.feature_info = [
            {"num_chs": c, "module": name, "reduction": 4 * 2 ** stage}
            for stage, name, c in self._tap_names()
        ]
        if self.branch is not None:
            from .memory_branch import BRANCH_TAPS

            self.feature_info += [{"num_chs": c, "module": f"branch.{name}", "reduction": None}
                                  for name, c in BRANCH_TAPS]

    def _tap_names(self):
        out = []
        for stage, (n_blocks, chans) in enumerate(zip(BLOCKS_PER_STAGE[self.cfg.backbone], STAGE_CHANNELS)):
            for i in range(n_blocks):
                out.append((stage, f"trunk.layer{stage + 1}.{i}", chans))
        return out if self.cfg.taps == "all" else out[-1:]

    def set_score_calibration(self, scale: float = 1.0, shift: float = 0.0) -> "ResMemNet":
        """Set the affine score calibration (1, 0 = none) of a config without named outputs."""
        return self.set_config(replace(self.cfg, score_scale=float(scale), score_shift=float(shift)))

    def set_profiles(self, profiles) -> "ResMemNet":
        """Replace the score profiles (ProfileSpecs over the named outputs, model/profiles.py)."""
        return self.set_config(replace(self.cfg, profiles=tuple(profiles)))

    def set_config(self, cfg: ResMemNetConfig) -> "ResMemNet":
        """A config that changes only how outputs become scores (profiles, calibration, blend, gate)."""
        if cfg.n_outputs != self.cfg.n_outputs or cfg.tap_channels != self.cfg.tap_channels:
            raise ValueError("set_config changes how outputs are scored, not the head's shape")
        self.cfg = cfg
        for module in self.head.modules():
            if isinstance(module, (TapHead, HeadEnsemble, TapReadout)):
                module.cfg = self.cfg
        return self

    # -- freezing -------------------------------------------------------------------------
    def set_trunk_frozen(self, frozen: bool = True) -> "ResMemNet":
        """Freeze (or unfreeze) the trunk's weights and BatchNorm statistics. Idempotent."""
        self.trunk_frozen = bool(frozen)
        for p in self.trunk.parameters():
            p.requires_grad_(not frozen)
        if self.branch is not None:  # the package's branch is never trained
            self.branch.requires_grad_(False)
        self.train(self.training)  # re-apply the BatchNorm mode
        return self

    def train(self, mode: bool = True) -> "ResMemNet":
        super().train(mode)
        if self.trunk_frozen:
            self.trunk.eval()  # frozen BatchNorm keeps its running statistics
        return self

    # -- forward --------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.input_mean.to(images.dtype)) / self.input_std.to(images.dtype)

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        return t.maxpool(t.relu(t.bn1(t.conv1(self.normalize(images)))))

    def blocks(self):
        t = self.trunk
        for layer in (t.layer1, t.layer2, t.layer3, t.layer4):
            yield from layer

    def forward_features(self, images: torch.Tensor, *, keep_maps: bool = False, fp32_last_stage: bool = False):
        """Pooled tap vectors [(B, C_i)], and the last block's feature map when keep_maps.

        fp32_last_stage: under autocast, run the last stage (layer4) in fp32; the deepest taps
        weigh most in the LSTM's final state, and keeping them out of fp16 halves the drift from
        fp32 scores at little cost.
        """
        x = self.stem(images)
        pooled = []
        last_stage = set(map(id, self.trunk.layer4)) if fp32_last_stage else set()
        for block in self.blocks():
            if id(block) in last_stage:
                x = run_block_fp32(block, x)
            else:
                x = block(x)
            if self.cfg.taps == "all":
                pooled.append(global_pool(x))
        if self.cfg.taps == "last":
            pooled.append(global_pool(x))
        if self.branch is not None:  # it reads the ImageNet logits of the last pooled tap
            pooled += self.branch(images, pooled[-1])
        return (pooled, x) if keep_maps else pooled

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))


BACKBONES = tuple(BLOCKS_PER_STAGE)


def build_resmemnet(*, backbone: str = "resnet50", trunk_source=None, allow_download: bool = True,
                    **overrides) -> ResMemNet:
    """Build ResMem-Net; `trunk_source` (a TrunkSource) initialises the trunk and sets its input scaling."""
    if trunk_source is not None:
        if trunk_source.depth != backbone:
            backbone = trunk_source.depth
        overrides.setdefault("input_scaling", trunk_source.input_scaling)
    cfg = ResMemNetConfig(backbone=backbone, **overrides)
    model = ResMemNet(cfg)
    if trunk_source is not None:
        load_source_weights(model, trunk_source, allow_download=allow_download)
    model.eval()
    return model


def load_source_weights(model: ResMemNet, source, *, allow_download: bool = True, trunk: bool = True) -> None:
    """Load the trunk (when `trunk`) and the memory branch (if the model has one) from `source`,
    reading its (hash-checked) file once. TrunkLoadError when the file does not fit."""
    from .trunks import TrunkLoadError, load_trunk_state, read_state_dict, remap_keys, resolve_weight_file

    if source.kind == "none" or not (trunk or model.branch is not None):
        return
    path = resolve_weight_file(source, allow_download=allow_download)
    raw = read_state_dict(path)
    if trunk:
        load_trunk_state(model.trunk, remap_keys(raw, source.key_map), origin=str(path))
    if model.branch is not None:
        from .memory_branch import branch_state_from_package

        try:
            model.branch.load_state_dict(branch_state_from_package(raw))
        except (KeyError, RuntimeError) as exc:
            raise TrunkLoadError(f"{path} holds no resmem memory branch ({type(exc).__name__}: {exc}); "
                                 "branch 'resmem' needs the resmem package's model file") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
