"""The LightningModules: one base (loss, metrics, optimizer, schedule, generation) and BigramLM, GPTLM."""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torchmetrics import MeanMetric

from lightning_charlm.data import IGNORE
from lightning_charlm.errors import CharLMError
from lightning_charlm.models import GPT, Bigram, GPTConfig
from lightning_charlm.optim import MuonAdamW, warmup_cosine
from lightning_charlm.runs import check_checkpoint
from lightning_charlm.sampling import GenerationConfig, check_settings, sample_text, stream_text
from lightning_charlm.tokenizer import tokenizer_for

MAX_WEIGHTS = 10**11  # 400 GB in fp32: anything larger is a typo, and would only hang or run out of memory
# What a GPT checkpoint means by the options it predates: written before they existed, it was built so.
LEGACY_GPT = {"positions": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": False, "tie_head": True,
              "zero_init": False, "optimizer": "adamw"}  # fmt: skip


SHARED_ARGS = """
            vocab: the sorted characters of the corpus; filled in by charlm from the corpus or checkpoint.
            lr: peak learning rate, reached after warmup_steps, then cosine decay to min_lr at max_steps.
            min_lr: the learning rate at trainer.max_steps.
            warmup_steps: steps of linear warmup from lr / (warmup_steps + 1) to lr.
            weight_decay: AdamW decay, applied to 2-D weights only (not to norm gains and biases).
            betas: AdamW's betas.
            label_smoothing: for the training loss only; validation metrics are always plain cross-entropy.
            fused: fused AdamW (one kernel for all parameters); default (null): on CUDA only.
            compile: torch.compile the network's blocks for training: faster steps on a GPU after seconds of
                compiling, which pay only for long runs (README, GPU section).
"""


class CharLM(L.LightningModule):
    """The model to train: GPTLM (the default) or BigramLM; `--model.help GPTLM` lists its options.
    (The base class: the loss, metrics, optimizer, schedule and generation; a subclass builds `self.net`.)"""

    def __init__(
        self,
        vocab: str | None = None,
        lr: float = 1e-3,
        min_lr: float = 1e-4,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        label_smoothing: float = 0.0,
        fused: bool | None = None,
        compile: bool = False,
    ):
        super().__init__()
        if not vocab:
            raise CharLMError("a model needs the corpus's vocabulary: pass vocab=datamodule.vocab")
        if not (lr > 0 and 0 <= min_lr <= lr):  # written so that nan fails too
            raise CharLMError(
                f"model.lr must be > 0 and 0 <= model.min_lr <= lr, got lr={lr}, min_lr={min_lr}"
            )
        if not 0 <= label_smoothing < 1:
            raise CharLMError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")
        if not (warmup_steps >= 0 and weight_decay >= 0):
            raise CharLMError("model.warmup_steps and model.weight_decay must be >= 0")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise CharLMError(f"model.betas must be two numbers in [0, 1), got {list(betas)}")
        self.save_hyperparameters()
        self.tokenizer = tokenizer_for(vocab)
        self.net = self.build_net(len(vocab))
        # Decided on the plain net: under FSDP the parameters become flat 1-D shards, so dims tell nothing.
        self._no_decay = {name for name, p in self.net.named_parameters() if p.dim() < 2}
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.last_train_loss: torch.Tensor | None = None
        self.interrupted = threading.Event()  # set by a signal during predict (writer.PredictionWriter)
        self.generation = GenerationConfig()  # how to sample: --generate.* (set by the CLI), not a hparam
        self.stream_to: Callable[[str], None] | None = None  # predict prints here as it generates (writer)
        self.progress_to: Callable[[int], None] | None = None  # characters generated, for predict's bar

    def build_net(self, vocab_size: int) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args: Any, **kwargs: Any) -> CharLM:
        """As Lightning's; called on CharLM itself, it checks the file first (runs.check_checkpoint: tensors
        and primitives only, a charlm checkpoint) and loads whichever model the checkpoint holds. A GPT
        written before an option existed is built as it was then (LEGACY_GPT)."""
        if cls is CharLM:
            hp = check_checkpoint(str(checkpoint_path))["hyper_parameters"]
            cls = GPTLM if hp.get("_class_path", "").endswith("GPTLM") or "n_layer" in hp else BigramLM
        elif issubclass(cls, GPTLM):
            hp = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
            hp = hp["hyper_parameters"]  # mmap: only the hyperparameters are read, not the weights
        if issubclass(cls, GPTLM):  # the options the checkpoint predates, as it was built (LEGACY_GPT)
            kwargs = {**legacy_options(hp), **kwargs}
        return super(CharLM, cls).load_from_checkpoint(checkpoint_path, *args, **kwargs)  # noqa: UP008 (cls changed)

    def check_data(self, dm) -> None:
        """Raise a CharLMError if the datamodule's windows do not suit the corpus or this model."""
        if dm is not None:
            dm.check()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def setup(self, stage: str) -> None:
        # seed_everything gave every rank the same seed, so dropout masks and samples drawn from the global
        # RNG would be identical on all ranks: offset it by rank, as nanoGPT does. (The weights are already
        # initialised alike.) A resumed run then restores each rank's saved state in on_train_start.
        seed = os.environ.get("PL_GLOBAL_SEED")
        if seed is not None and self.trainer.world_size > 1:
            torch.manual_seed(int(seed) + self.global_rank)  # CPU and every CUDA device
        if self.hparams.compile and stage != "predict" and hasattr(self.net, "compile_blocks"):
            self.net.compile_blocks()

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self.net(x).flatten(0, 1).float()  # (B * T, V); fp32 for a stable log-softmax under bf16
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, y.flatten(), ignore_index=IGNORE, label_smoothing=smoothing)
        if stage == "train":
            self.last_train_loss = loss.detach()  # shown by the progress bar (callbacks.StepProgressBar)
            if self._logging_step():
                self.log("train/loss", self.last_train_loss, on_step=True, on_epoch=False)
                self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        else:
            # Weighted by scored tokens, so val/loss is the exact mean over every validation character,
            # also when windows score different counts and under DDP.
            metric = self.val_loss if stage == "val" else self.test_loss
            metric.update(loss, weight=(y != IGNORE).sum())
            self.log(f"{stage}/loss", metric, prog_bar=stage == "val")
        return loss

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip here, not through the precision plugin: it refuses fused AdamW under any *-mixed precision
        (bf16 too) and any norm clipping under FSDP. Logs the norm before clipping as train/grad_norm."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # 16-mixed: Lightning leaves unscaling to a fused optimizer's step; clipping needs true gradients.
            # (The scaler then tells the fused step that the gradients are already unscaled.)
            scaler.unscale_(optimizer)
        by_value = gradient_clip_algorithm == "value"
        max_norm = gradient_clip_val if gradient_clip_val and not by_value else float("inf")
        norm = clip_grad_norm(self.trainer.model, max_norm)
        if by_value and gradient_clip_val:
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
        if self._logging_step():
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def _logging_step(self) -> bool:
        """Whether the logger writes at this step. Per-step values are logged only then: each self.log call
        costs the Trainer about a millisecond of CPU, which on a GPU is a tenth of a step. The last step is
        written too (Lightning writes then whatever was logged last: it would repeat an older step's)."""
        last = 0 < self.trainer.max_steps <= self.trainer.global_step + 1
        return self.trainer._logger_connector.should_update_logs or last

    def on_validation_epoch_end(self) -> None:
        self._log_derived("val", self.val_loss)

    def on_test_epoch_end(self) -> None:
        self._log_derived("test", self.test_loss)

    VAL_METRICS = ("val/loss", "val/ppl", "val/bpc")  # logged at every validation: what callbacks can watch

    def _log_derived(self, stage: str, metric: MeanMetric) -> None:
        loss = metric.compute()  # synced across ranks; Lightning logs and resets the metric itself
        # Identical on every rank already, so averaging them (sync_dist) changes nothing but the warning.
        self.log(f"{stage}/ppl", loss.exp(), sync_dist=True)
        self.log(f"{stage}/bpc", loss / math.log(2), sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every rank's RNG state (dropout draws from it), gathered so one file restores all ranks. Tensors
        # only, so the checkpoint loads with weights_only=True.
        checkpoint["rng"] = {"cpu": self.all_gather(torch.get_rng_state().to(self.device)).cpu()}
        checkpoint["lr_schedule"] = getattr(self, "schedule", None)
        if self.device.type == "cuda":
            checkpoint["rng"]["cuda"] = self.all_gather(
                torch.cuda.get_rng_state(self.device).to(self.device)
            ).cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("rng")
        self._saved_schedule = checkpoint.get("lr_schedule")  # None in checkpoints older than it
        self._resumed_at = checkpoint.get("global_step", 0)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # The logger's step equals global_step when a step begins. Lightning counts it after the step's
        # validation, so a checkpoint written there holds it one behind; on a resume Lightning makes up for
        # that in some cases (a regular round) and not in others (a run stopped at max_steps or by a
        # callback), and every such resume shifted later TensorBoard points back by one step.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.trainer.global_step

    def on_train_start(self) -> None:
        # Applied here, not at load: the sanity check and other set-up between the two must not use it up.
        rng, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if rng is None:
            return
        rank = self.global_rank
        rows = rng["cpu"] if rng["cpu"].dim() == 2 else rng["cpu"][None]  # (saved ranks, n)
        if rank < len(rows):
            # A copy: set_rng_state reads the storage from its start, so a view at an offset would crash.
            torch.set_rng_state(rows[rank].clone())
            if "cuda" in rng and self.device.type == "cuda":
                cuda = rng["cuda"] if rng["cuda"].dim() == 2 else rng["cuda"][None]
                torch.cuda.set_rng_state(cuda[rank].clone(), self.device)
        else:  # a run resumed on more ranks than saved it: a new rank's stream, distinct from the others
            saved = torch.Generator()
            saved.set_state(rows[0].clone())
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=saved)) + rank)

    def on_predict_start(self) -> None:
        g = self.generation  # checked against the vocabulary before anything is printed
        check_settings(g.temperature, g.top_k, g.top_p, len(self.tokenizer))
        if self.generation.seed is None:  # a fresh seed per run, the same on every rank, and said aloud
            seed = self.trainer.strategy.broadcast(secrets.randbelow(2**31))
            self.generation = replace(self.generation, seed=seed)
            if self.generation.temperature > 0:  # greedy decoding draws nothing: no seed to repeat
                rank_zero_info(f"sampling seed {seed} (--generate.seed {seed} repeats this output)")

    def predict_step(self, batch: list[tuple[str, int]], batch_idx: int) -> list[dict[str, Any]]:
        """One record per (prompt, sample) of the batch: the prompt, its continuation, and the settings
        (with the run's seed). A continuation's noise comes from the seed, its prompt and sample number
        only (sampling.row_seed): the same text whatever the batch size, the other prompts or the rank."""
        prompts, samples = [p for p, _ in batch], [n for _, n in batch]
        settings, stop = self.generation, self.interrupted.is_set
        if self.stream_to is not None and len(prompts) == 1:  # one prompt on a terminal: text as it comes
            self.stream_to(prompts[0])
            pieces = self.stream(prompts[0], settings, stop, sample=samples[0])
            texts = ["".join(self.stream_to(piece) or piece for piece in pieces)]
        else:
            texts = self.generate(prompts, settings, stop, progress=self.progress_to, samples=samples)
        record = asdict(self.generation) | ({"seed": None} if self.generation.temperature == 0 else {})
        return [{"prompt": p, "text": t, **record} for p, t in zip(prompts, texts, strict=True)]

    def generate(
        self,
        prompts: str | list[str],
        settings: GenerationConfig | None = None,
        interrupted: Callable[[], bool] | None = None,
        progress: Callable[[int], None] | None = None,
        samples: list[int] | None = None,
        **overrides: Any,
    ) -> str | list[str]:
        """The continuation of a prompt (a list for a list of prompts), in eval mode.

        `settings` default to the module's own (`self.generation`: --generate.* on the command line); keyword
        arguments override single fields: `lm.generate("ROMEO:", max_new_tokens=200, seed=1)`. `progress`,
        if given, is called with the number of characters each step of generation adds. With a seed, each
        prompt's text depends on the seed, the prompt and which of its repeats it is (`samples`; by default
        counted in the list) only."""
        if not isinstance(prompts, str) and not (
            isinstance(prompts, list | tuple) and all(isinstance(p, str) for p in prompts)
        ):
            raise CharLMError(f"generate takes a prompt (a str) or a list of them, got {prompts!r:.80}")
        settings = replace(settings or self.generation, **overrides)
        with self._eval():
            listed = [prompts] if isinstance(prompts, str) else list(prompts)
            texts = sample_text(
                self.net, self.tokenizer, listed, settings, interrupted=interrupted, progress=progress,
                samples=samples,
            )  # fmt: skip
        return texts[0] if isinstance(prompts, str) else texts

    def stream(
        self,
        prompt: str,
        settings: GenerationConfig | None = None,
        interrupted: Callable[[], bool] | None = None,
        sample: int = 0,
        **overrides: Any,
    ) -> Iterator[str]:
        """The continuation of `prompt` (its `sample`-th, 0 the first), a character at a time as it is
        generated; joined, it is the text `generate` gives for the same settings."""
        if not isinstance(prompt, str):
            raise CharLMError(
                f"stream continues one prompt, a str (generate takes a list), got {prompt!r:.80}"
            )
        settings = replace(settings or self.generation, **overrides)
        with self._eval():
            net, tokenizer = self.net, self.tokenizer
            yield from stream_text(net, tokenizer, prompt, settings, interrupted=interrupted, sample=sample)

    @contextlib.contextmanager
    def _eval(self):
        was_training = self.net.training
        self.net.eval()
        try:
            yield
        finally:
            self.net.train(was_training)

    def _fused(self) -> bool:
        """--model.fused, by default on where the run's device is a CUDA GPU."""
        return self.device.type == "cuda" if self.hparams.fused is None else self.hparams.fused

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        named = [(_plain_name(n), p) for n, p in self.net.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n not in self._no_decay], "weight_decay": hp.weight_decay},
            {"params": [p for n, p in named if n in self._no_decay], "weight_decay": 0.0},
        ]
        if hp.get("optimizer", "adamw") == "muon":
            # Muon orthogonalises whole weight matrices: those inside the blocks. Embeddings, the head and
            # the gains stay with AdamW (as in the modded-nanogpt speedrun).
            muon = [(n, p) for n, p in named if n.startswith("blocks.") and n not in self._no_decay]
            if not muon or any(p.dim() != 2 for _, p in muon):  # FSDP's flat shards are 1-D
                raise CharLMError("model.optimizer muon needs whole weight matrices: not under FSDP")
            ids = {id(p) for _, p in muon}
            groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
            muon_groups = [{"params": [p for _, p in muon], "weight_decay": hp.weight_decay}]
            optimizer = MuonAdamW(muon_groups, groups, lr=hp.lr, betas=hp.betas, fused=self._fused())
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=hp.betas, fused=self._fused())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._schedule())
        # interval "step": with max_steps and one endless epoch an epoch scheduler would never step.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _schedule(self):
        """optim.warmup_cosine to trainer.max_steps (not estimated_stepping_batches: #20550), continuing the
        schedule of the checkpoint resumed from; its state goes into checkpoints (on_save_checkpoint)."""
        hp = self.hparams
        saved, resumed_at = getattr(self, "_saved_schedule", None), getattr(self, "_resumed_at", 0)
        factor, self.schedule, change = warmup_cosine(
            hp.lr, hp.min_lr, hp.warmup_steps, self.trainer.max_steps, saved, resumed_at
        )
        if change:
            rank_zero_info(f"charlm: {change}")
        return factor


def _plain_name(name: str) -> str:
    """A parameter's name in the plain net, without the segments that FSDP or checkpoint wrappers add."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def legacy_options(hparams: dict[str, Any]) -> dict[str, Any]:
    """The GPT options a checkpoint's hyperparameters predate, with the values it was built with."""
    return {k: v for k, v in LEGACY_GPT.items() if k not in hparams}


def clip_grad_norm(root: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients of `root` to a total norm of `max_norm` (inf: only measure); returns the norm
    before clipping. Under FSDP each rank holds a shard of every gradient: FSDP's own clip sums the squared
    norms over ranks first, so every rank scales by the same, global factor."""
    if isinstance(root, FullyShardedDataParallel):
        return root.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_([p for p in root.parameters() if p.grad is not None], max_norm)


class BigramLM(CharLM):
    """The baseline: a V x V table of next-character logits."""

    def __init__(
        self,
        vocab: str | None = None,
        lr: float = 1e-2,
        min_lr: float = 1e-3,
        warmup_steps: int = 0,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        label_smoothing: float = 0.0,
        fused: bool | None = None,
        compile: bool = False,
    ):
        super().__init__(
            vocab, lr, min_lr, warmup_steps, weight_decay, betas, label_smoothing, fused, compile
        )

    def build_net(self, vocab_size: int) -> nn.Module:
        return Bigram(vocab_size)

    __init__.__doc__ = f"""The bigram's options.

        Args:{SHARED_ARGS}"""


class GPTLM(CharLM):
    """A GPT (models/gpt.py): token embeddings, pre-norm attention blocks and a head."""

    def __init__(
        self,
        vocab: str | None = None,
        block_size: int = 256,
        n_layer: int = 6,
        n_head: int = 6,
        n_embd: int = 384,
        dropout: float = 0.2,
        lr: float = 1e-3,
        min_lr: float = 1e-4,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        label_smoothing: float = 0.0,
        checkpointing: bool = False,
        fused: bool | None = None,
        compile: bool = False,
        positions: Literal["learned", "rope"] = "learned",
        norm: Literal["layernorm", "rmsnorm"] = "layernorm",
        mlp: Literal["gelu", "relu2", "swiglu"] = "gelu",
        qk_norm: bool = False,
        tie_head: bool = True,
        zero_init: bool = False,
        optimizer: Literal["adamw", "muon"] = "adamw",
    ):
        super().__init__(
            vocab, lr, min_lr, warmup_steps, weight_decay, betas, label_smoothing, fused, compile
        )

    __init__.__doc__ = f"""The GPT's options.

        Args:
            block_size: the context length: the longest text it attends to (the data windows follow it).
            n_layer: transformer blocks.
            n_head: attention heads per block (n_embd must be divisible by it).
            n_embd: the width of the residual stream.
            dropout: dropout rate in training.
            checkpointing: recompute activations in the backward pass (activation checkpointing):
                larger blocks and batches fit in less memory, for one more forward pass of each block.
            positions: learned (GPT-2's position embedding) or rope (rotary: relative positions; past
                block_size, generation attends over a sliding window and its KV cache slides with it).
            norm: layernorm or rmsnorm.
            mlp: gelu (GPT-2's 4x MLP), relu2 (relu squared) or swiglu (gated, 8/3x wide).
            qk_norm: RMSNorm on each head's queries and keys.
            tie_head: the output head shares the token embedding's weights.
            zero_init: output projections (and an untied head) start at zero.
            optimizer: adamw, or muon (Muon for the matrices inside the blocks, AdamW for the rest; one lr).
            {SHARED_ARGS.strip()}"""

    def build_net(self, vocab_size: int) -> nn.Module:
        hp = self.hparams
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            if hp[name] < 1:
                raise CharLMError(f"model.{name} must be a positive integer, got {hp[name]}")
        if hp.n_embd % hp.n_head:
            raise CharLMError(f"model.n_embd ({hp.n_embd}) must be divisible by model.n_head ({hp.n_head})")
        if not 0 <= hp.dropout < 1:
            raise CharLMError(f"model.dropout must be in [0, 1), got {hp.dropout}")
        weights = 12 * hp.n_layer * hp.n_embd**2 + (vocab_size + hp.block_size) * hp.n_embd
        if weights > MAX_WEIGHTS:
            raise CharLMError(
                f"model.n_layer {hp.n_layer}, n_embd {hp.n_embd} and block_size {hp.block_size} make a GPT "
                f"of about {weights:.1e} weights, more than {MAX_WEIGHTS:.0e}: no machine holds it"
            )
        return GPT(
            GPTConfig(
                vocab_size=vocab_size,
                block_size=hp.block_size,
                n_layer=hp.n_layer,
                n_head=hp.n_head,
                n_embd=hp.n_embd,
                dropout=hp.dropout,
                checkpointing=hp.checkpointing,
                **{k: hp[k] for k in LEGACY_GPT if k != "optimizer"},  # the net's options
            )
        )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage in ("fit", "validate"):
            self.check_data(self.trainer.datamodule)

    def check_data(self, dm) -> None:
        super().check_data(dm)
        if dm is not None and dm.block_size > self.hparams.block_size:
            raise CharLMError(
                f"data.block_size ({dm.block_size}) is longer than the model's context "
                f"model.block_size ({self.hparams.block_size}); leave data.block_size out to use the model's"
            )
