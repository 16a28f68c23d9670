"""A ResMem-Net's architecture as data (ResMemNetConfig, stored in every checkpoint's metadata),
without torch: reading a checkpoint's metadata, its profiles and its tap layout needs no model.
The network built from it lives in model/network.py."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from . import profiles as _profiles
from .profiles import ProfileSpec

BLOCKS_PER_STAGE = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
STAGE_CHANNELS = (256, 512, 1024, 2048)

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
        if self.branch != "resmem":
            return self.trunk_tap_channels
        from .memory_branch import BRANCH_TAPS

        return self.trunk_tap_channels + [c for _, c in BRANCH_TAPS]
