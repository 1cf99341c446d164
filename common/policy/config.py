"""``PolicyTrainConfig``: the flags of ``phase2_draft_retrain/modal_train_draft_with_projection.py``
(the same on the local CLI and ``modal run``), validated, with the paths and loop settings they imply."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from common.artifacts import ROBUST_TOKENIZER, data_dir_of, models_dir_of, policy_paths, results_dir_of
from common.policy.draft import DRAFT_ACTIVATIONS, DRAFT_INPUTS, DRAFT_MODES, DRAFT_TRUNKS
from common.policy.feature_cache import feature_cache_path
from common.policy.model import BACKBONES
from common.training_loop import LoopSettings, RunFiles

STAGES = ("main", "draft")
# Flags that may change between a run and its --resume.
RESUMABLE_CHANGES = ("resume", "overwrite", "progress", "epochs", "torch_threads", "train", "timing_repeats", "device")


@dataclass
class PolicyTrainConfig:
    """Flags of ``modal_train_draft_with_projection`` (same names on the local CLI and ``modal run``)."""

    num_episodes: int = 200  # total demos over all --data files (round-robin over tasks); 0 = all
    epochs: int = 50  # passes over the training steps, per stage (main and draft)
    batch_size: int = 32  # steps (observation, token chunk) per optimizer step
    lr: float = 3e-4  # peak AdamW learning rate (warmup, then cosine decay to 0)
    seed: int = 0  # seeds the episode split, the initialization and the shuffles
    data: str = ""  # HDF5 path, or comma-separated paths (e.g. object + spatial demos)
    rfsq_checkpoint: str = ""  # "" = <models dir>/rfsq_robust_best.pt
    backbone: str = "state"  # state | openvla-oft
    # state backbone: also read each object's position relative to the end effector (and the goal
    # object's relative to its target), which carry over to layouts the demos never showed
    eef_relative: bool = False
    # K: layers the draft predicts; 0 = from the main model's decode choice (the layers Phase 3
    # executes): min(3, decoded - 1), since the verify pass must stay inside the decoded layers
    coarse_layers: int = 3
    train: str = "main,draft"  # stages to run: main, draft or both
    tag: str = ""  # output suffix; "" = from the tokenizer ("" robust, "naive" naive)
    models_dir: str = ""  # "" = $RSD_MODELS_DIR or ./artifacts/models (Modal: /models)
    results_dir: str = ""  # "" = $RSD_RESULTS_DIR or ./results (Modal: /data/results): the training summary
    data_dir: str = ""  # "" = $RSD_DATA_DIR or ./data (Modal: /data): where the feature cache is looked up
    val_fraction: float = 0.2  # fraction of EPISODES held out for validation (never frames)
    d_model: int = 256  # main model (RFSQ head) width
    num_blocks: int = 4  # main model transformer blocks
    num_heads: int = 4  # attention heads per block (must divide --d-model)
    draft_width: int = 128  # draft model hidden width
    draft_hidden_layers: int = 2  # draft model hidden layers after its input projection
    draft_trunk: str = "residual"  # residual (LayerNorm residual blocks) | mlp (plain GELU MLP: fewer ops, cheaper at batch 1)
    # the mlp trunk's nonlinearity: gelu | gelu_tanh | relu (float32 exact GELU is slow at batch 1 on a CPU)
    draft_activation: str = "gelu"
    # parallel = all K layers from one linear head; chained = layer l conditioned on the draft's own
    # tokens of layers < l, as the main model is (still one draft call; see common/policy/draft.py)
    draft_mode: str = "parallel"
    # What the draft learns: "main" = the main model's own greedy coarse tokens (distillation: what
    # speculative decoding accepts), "labels" = the tokenizer's tokens of the demo actions.
    draft_targets: str = "main"
    # With --draft-targets main: learn the main model's full distributions (KL) rather than its argmax
    # tokens; the draft then learns where the main model is near a tie (what candidates exploit)
    draft_soft_targets: bool = False
    # What the draft reads: "features" (the backbone's, one call before the main model) or
    # "main_hidden" (the main model's position-0 hidden state + its layer-0 tokens: it then proposes
    # layers 1..K for a few small ops; needs --draft-targets main and --coarse-layers <= layers - 2)
    draft_input: str = "features"
    # Distillation targets are free to compute on ANY input, so the draft can also learn the main
    # model's choices on perturbed inputs: copy c adds Gaussian noise of (c+1)/copies * noise * (each
    # input dimension's std over the training steps). In closed loop the robot drifts off the demo
    # states, where a draft fit only to demo states agrees with the main model much less often.
    draft_augment_copies: int = 0  # perturbed copies of the training inputs for distillation (0 = none)
    draft_augment_noise: float = 0.1  # largest perturbation, in units of each input dimension's std
    # Phase 3 run folders (comma-separated) made with --record-features by THIS main model: the
    # closed-loop states its policy visited, added to the distillation set (common/data/rollouts.py)
    draft_rollouts: str = ""
    # Per chunk and layer, the probability that the main model reads its own argmax instead of the
    # demo's tokens, with the later layers' targets relabelled to correct it (common/policy/losses.py)
    own_prefix_prob: float = 0.0
    # Weight of the ordinal loss term: each token's mean level value vs its target's (what
    # --decode-rule expected decodes); 0 = plain cross-entropy
    expected_value_weight: float = 0.0
    feature_cache: str = ""  # openvla-oft: cache file(s) parallel to --data; "" = <data dir>/features/<stem>.openvla_oft_features.h5
    weight_decay: float = 0.01  # AdamW weight decay
    timing_repeats: int = 200  # batch-1 calls per model for the measured cost ratio
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    resume: bool = False  # continue each stage from its *_last.pt (the same configuration; more --epochs allowed)
    overwrite: bool = False  # replace the outputs of an earlier run (default: refuse when they exist)
    progress: bool = True  # show progress bars
    torch_threads: int = 1  # tiny models: one thread is fastest on a shared CPU; 0 = torch default

    def __post_init__(self):
        if not self.data.strip():
            raise ValueError(
                "--data is required: pass a LIBERO-format HDF5 demo file (or a comma-separated list); "
                "generate demos with `python -m phase1_improved.collect_demos`"
            )
        if self.draft_mode not in DRAFT_MODES:
            raise ValueError(f"--draft-mode must be one of {DRAFT_MODES}; got {self.draft_mode!r}")
        if self.draft_trunk not in DRAFT_TRUNKS:
            raise ValueError(f"--draft-trunk must be one of {DRAFT_TRUNKS}; got {self.draft_trunk!r}")
        if self.draft_activation not in DRAFT_ACTIVATIONS:
            raise ValueError(f"--draft-activation must be one of {tuple(DRAFT_ACTIVATIONS)}; got {self.draft_activation!r}")
        if self.draft_activation != "gelu" and self.draft_trunk != "mlp":
            raise ValueError(f"--draft-activation {self.draft_activation} needs --draft-trunk mlp (the residual trunk uses GELU)")
        if self.draft_input not in DRAFT_INPUTS:
            raise ValueError(f"--draft-input must be one of {DRAFT_INPUTS}; got {self.draft_input!r}")
        if self.draft_input == "main_hidden" and self.draft_targets != "main":
            raise ValueError("--draft-input main_hidden needs --draft-targets main (its prefix is the main model's layer 0)")
        if self.draft_targets not in ("main", "labels"):
            raise ValueError(f"--draft-targets must be main or labels; got {self.draft_targets!r}")
        if self.draft_augment_copies < 0 or self.draft_augment_noise < 0:
            raise ValueError(
                f"--draft-augment-copies and --draft-augment-noise must be >= 0; got {self.draft_augment_copies}, {self.draft_augment_noise}"
            )
        if self.draft_rollouts.strip() and self.draft_targets != "main":
            raise ValueError("--draft-rollouts needs --draft-targets main (rollout states have no demo tokens)")
        if self.draft_augment_copies and self.draft_targets != "main":
            raise ValueError("--draft-augment-copies needs --draft-targets main (perturbed inputs have no demo tokens)")
        if self.draft_augment_copies and self.draft_augment_noise == 0:
            raise ValueError("--draft-augment-copies > 0 needs --draft-augment-noise > 0")
        if self.backbone not in BACKBONES:
            raise ValueError(f"--backbone must be one of {BACKBONES}; got {self.backbone!r}")
        if self.eef_relative and self.backbone != "state":
            raise ValueError(f"--eef-relative is an option of the state backbone; got --backbone {self.backbone}")
        stages = self.stages
        if not stages or any(s not in STAGES for s in stages):
            raise ValueError(f"--train must be a comma-separated subset of {STAGES}; got {self.train!r}")
        if self.num_episodes < 0:
            raise ValueError(f"--num-episodes must be >= 0 (0 = all); got {self.num_episodes}")
        if self.coarse_layers < 0:
            raise ValueError(f"--coarse-layers must be >= 0 (0 = from the decode choice); got {self.coarse_layers}")
        for name in ("epochs", "batch_size", "d_model", "num_blocks", "num_heads", "draft_width", "timing_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.draft_hidden_layers < 0:
            raise ValueError(f"--draft-hidden-layers must be >= 0; got {self.draft_hidden_layers}")
        if self.d_model % self.num_heads:
            raise ValueError(f"--d-model ({self.d_model}) must be divisible by --num-heads ({self.num_heads})")
        if not 0.0 <= self.own_prefix_prob <= 1.0:
            raise ValueError(f"--own-prefix-prob must be in [0, 1]; got {self.own_prefix_prob}")
        if self.expected_value_weight < 0:
            raise ValueError(f"--expected-value-weight must be >= 0; got {self.expected_value_weight}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0; got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0; got {self.weight_decay}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in (0, 1); got {self.val_fraction}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda; got {self.device!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the earlier run, --overwrite replaces it: pass one of them")
        if self.tag and not all(c.isalnum() or c in "-_." for c in self.tag):
            raise ValueError(f"--tag may only hold letters, digits, '-', '_' and '.'; got {self.tag!r}")
        if self.feature_cache and len(self.feature_cache_paths) != len(self.data_paths):
            raise ValueError(
                f"--feature-cache must name one file per --data file ({len(self.data_paths)}); got {self.feature_cache!r}"
            )

    @property
    def stages(self) -> list[str]:
        return [s.strip() for s in self.train.split(",") if s.strip()]

    @property
    def data_paths(self) -> list[str]:
        return [p.strip() for p in self.data.split(",") if p.strip()]

    @property
    def feature_cache_paths(self) -> list[Path]:
        if self.feature_cache:
            return [Path(p.strip()) for p in self.feature_cache.split(",") if p.strip()]
        return [feature_cache_path(data_dir_of(self.data_dir), p) for p in self.data_paths]

    def root(self) -> Path:
        return models_dir_of(self.models_dir)

    def tokenizer_path(self) -> Path:
        return Path(self.rfsq_checkpoint) if self.rfsq_checkpoint else self.root() / ROBUST_TOKENIZER

    def output_paths(self, tag: str) -> dict[str, Path]:
        return policy_paths(self.root(), results_dir_of(self.results_dir), tag)

    def stage_outputs(self, paths: dict[str, Path]) -> list[Path]:
        """The files the requested stages write (what a fresh run refuses to replace)."""
        keys = {"main": ("head", "head_last", "head_metrics"), "draft": ("draft", "draft_last", "draft_metrics")}
        return [paths[k] for stage in self.stages for k in keys[stage]]

    def loop_settings(self, *, stage: str, salt: int, num_train: int) -> LoopSettings:
        total = max(1, self.epochs * -(-num_train // self.batch_size))
        return LoopSettings(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed, weight_decay=self.weight_decay,
            warmup_steps=min(100, max(1, total // 20)), clip_grad_norm=1.0, salt=salt, progress=self.progress, desc=stage,
        )

    def run_files(self, paths: dict[str, Path], stage: str, state_kind: str, checks: dict) -> RunFiles:
        return RunFiles(
            state_path=paths[f"{stage}_last"], metrics_path=paths[f"{stage}_metrics"], state_kind=state_kind,
            config=asdict(self), resumable_changes=RESUMABLE_CHANGES, resume=self.resume, checks=checks,
        )
