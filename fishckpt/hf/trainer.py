"""FishTrainer: Hugging Face's ``Trainer`` training a FISH mask with SparseAdamW, checkpointed into a fishckpt store.

A ``TrainerCallback`` cannot do this: the Trainer builds its optimizer inside ``train()`` and
callbacks receive it only to read (``on_train_begin`` gets it after ``accelerator.prepare``), and
the dense ``checkpoint-N`` folders are written by ``Trainer._save_checkpoint`` whatever a
callback does. So this is a subclass that overrides the Trainer's own hooks for those steps:

- ``create_optimizer``: ``SparseAdamW`` over the mask, with the arguments' learning rate, betas,
  epsilon and weight decay; the Trainer's scheduler (``lr_scheduler_type``, warmup) wraps it.
- ``_clip_grad_norm`` / ``_get_grad_norm``: the norm of the masked gradient entries only
  (``clip_masked_grad_norm_``), clipped at ``max_grad_norm``, as the FISH reference clips.
- ``_save_checkpoint``: a step of the store, through ``Checkpointer``, instead of a folder.
- ``_load_from_checkpoint``, ``_load_optimizer_and_scheduler``, ``_load_scaler``, ``_load_rng_state``
  and ``_load_best_model``: from the store.

They are private methods of transformers, so this module is tested against the version the
Makefile pins (``TRANSFORMERS_SPEC``); ``pyproject.toml``'s ``hf`` extra states the range.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import glob
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import (
    InvalidArgumentError,
    MaskMismatchError,
    MissingDependencyError,
    StateMismatchError,
    StepExistsError,
)
from ..mask import Mask
from ..method.clip import clip_masked_grad_norm_
from ..method.fisher import fisher_scores
from ..method.optim import SparseAdamW
from ..method.select import fish_mask
from ..store.store import CheckpointStore
from ..train.checkpointer import Checkpointer
from .export import HF_METADATA_KEY

try:
    import accelerate  # noqa: F401  # the Trainer needs it; fail here, with the fix, not deep inside train()
    from transformers import Trainer
    from transformers.trainer_callback import ExportableState
    from transformers.trainer_utils import SaveStrategy
except ImportError as error:
    raise MissingDependencyError(
        f"fishckpt.hf.FishTrainer needs transformers and accelerate: pip install 'fishckpt[hf]' ({error})"
    ) from error

__all__ = ["FishTrainer"]

logger = logging.getLogger("fishckpt")

_TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
_ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw_hf")  # the optimizers SparseAdamW stands in for
_HEAD_MODULES = ("classifier", "fc", "lm_head", "score")  # as fishckpt.fish_mask's head warning
_FISHER_BATCH = 8  # examples of equal shape scored together on the vmap path


@dataclass
class _Resume:
    """A resume in progress: the step, and the folder holding its trainer_state.json."""

    step: int
    folder: str
    saved: dict[str, Any]  # the step's "hf" metadata


class FishTrainer(Trainer):  # type: ignore[misc]  # transformers is not type-checked here (pyproject)
    """A ``transformers.Trainer`` that trains only a FISH mask and saves sparse, bit-exact checkpoints.

    Replace ``Trainer(...)`` with ``FishTrainer(...)``; everything else in the script stays::

        from fishckpt.hf import FishTrainer
        trainer = FishTrainer(model=model, args=args, train_dataset=train, keep_ratio=0.005)
        trainer.train()                               # or train(resume_from_checkpoint=True)

    When ``train()`` starts a run, it scores every trainable parameter by empirical Fisher over
    ``fisher_samples`` examples of ``train_dataset`` (shuffled with ``args.data_seed`` or
    ``args.seed``, collated one by one with the Trainer's own collator, so without padding),
    keeps the top ``keep_ratio`` of all entries with the head always trainable and counted in
    k, and creates a store at ``store`` from the model's weights as they are then (the base).
    A ``mask`` given instead skips the Fisher pass.

    Training runs through ``SparseAdamW`` on the masked entries (``learning_rate``,
    ``adam_beta1/2``, ``adam_epsilon``, ``weight_decay``; the Trainer's scheduler and warmup
    apply), clipping the norm of the masked gradients at ``max_grad_norm``. Every other weight
    stays bit-identical to the base.

    Saves follow the Trainer's schedule (``save_strategy``, ``save_steps``) into the store
    through ``fishckpt.Checkpointer``, in the background: the masked values, the optimizer,
    scheduler and RNG states, and, in the step's metadata under ``"hf"``, the Trainer's state
    (global step, epoch, logs, best metric), the model's config and the gradient scaler. No
    ``checkpoint-N`` folder is written. ``save_total_limit`` keeps that many newest steps (plus
    the best one under ``load_best_model_at_end``); ``save_only_model`` saves weights alone.

    ``train(resume_from_checkpoint=True)`` resumes from the store's latest step (an int picks
    a step) bit for bit as if never stopped: weights, optimizer, scheduler, RNG, the Trainer's
    state, and the data order, through the Trainer's own skipping of the batches already seen.

    Args:
        *args: The Trainer's positional arguments.
        mask: Train this mask instead of computing one (it must cover the trainable parameters by name).
        keep_ratio: The fraction of all trainable entries to train, head included (default 0.5%).
        fisher_samples: How many training examples the Fisher is averaged over (all of them if fewer).
        head: Parameter name patterns (``fnmatch``) trained whole and counted in k. None detects the
            head: the parameters outside ``model.base_model_prefix`` (a classifier, say), or, in a
            model without one, those under a top-level ``classifier``, ``fc``, ``lm_head`` or
            ``score``. ``[]`` trains no head whole.
        store: Where the store lives: a folder or a URL (``s3://...``, docs/storage.md). Default
            ``<output_dir>/fishckpt``.
        check_outside_mask: Run the exact check at each save (docs/exactness.md). SparseAdamW never
            moves a weight outside the mask, so ``False`` (the fast path) is safe when nothing else
            changes the model during training.
        **kwargs: The Trainer's keyword arguments. ``optimizers`` may carry a scheduler but no
            optimizer, and ``optimizer_cls_and_kwargs`` and ``model_init`` are refused.

    Raises:
        InvalidArgumentError: An option out of range, an optimizer passed in, or ``optim`` not AdamW.
        NotImplementedError: DeepSpeed, FSDP, ``model_init`` or hub pushes of checkpoints.

    Example:
        >>> args = TrainingArguments("out", learning_rate=2e-3, save_steps=50, save_total_limit=3)
        >>> trainer = FishTrainer(model=model, args=args, train_dataset=train, keep_ratio=0.005)
        >>> trainer.train()
        >>> trainer.store.steps
        [100, 150, 200]
    """

    optimizer: Any  # the Trainer's: SparseAdamW, or accelerate's wrapper of it once training starts

    def __init__(
        self,
        *args: Any,
        mask: Mask | None = None,
        keep_ratio: float = 0.005,
        fisher_samples: int = 1024,
        head: Sequence[str] | None = None,
        store: str | os.PathLike[str] | None = None,
        check_outside_mask: bool = True,
        **kwargs: Any,
    ) -> None:
        if mask is not None and not isinstance(mask, Mask):
            raise InvalidArgumentError(f"mask must be a fishckpt.Mask, not {type(mask).__name__}")
        if not (isinstance(keep_ratio, (int, float)) and 0.0 < keep_ratio <= 1.0):
            raise InvalidArgumentError(f"keep_ratio must be in (0, 1], not {keep_ratio!r}")
        if isinstance(fisher_samples, bool) or not isinstance(fisher_samples, int) or fisher_samples < 1:
            raise InvalidArgumentError(f"fisher_samples must be a positive int, not {fisher_samples!r}")
        if isinstance(head, str):
            raise InvalidArgumentError(f"head takes a list of name patterns, e.g. [{head!r}], not a string")
        super().__init__(*args, **kwargs)
        if self.model_init is not None:
            raise NotImplementedError(
                "FishTrainer does not support model_init (hyper-parameter search): the mask and the store "
                "belong to one model; pass model= instead"
            )
        if self.optimizer is not None or self.optimizer_cls_and_kwargs is not None:
            raise InvalidArgumentError(
                "FishTrainer trains with its own fishckpt.SparseAdamW over the mask; drop the optimizer from "
                "optimizers= and optimizer_cls_and_kwargs= (learning rate, betas, epsilon and weight decay "
                "come from TrainingArguments)"
            )
        self._check_arguments()
        self._given_mask = mask
        self.keep_ratio = float(keep_ratio)
        self.fisher_samples = fisher_samples
        self.head = list(head) if head is not None else None
        self.store_location = str(store) if store is not None else os.path.join(self.args.output_dir, "fishckpt")
        self.check_outside_mask = check_outside_mask
        self.store: CheckpointStore | None = None  # opened or created when train() starts
        self.mask: Mask | None = mask  # the mask trained (the store's, once train() starts)
        self.checkpointer: Checkpointer | None = None
        self._sparse_optimizer: SparseAdamW | None = None  # self.optimizer may be accelerate's wrapper of it
        self._resume: _Resume | None = None

    def _check_arguments(self) -> None:
        args = self.args
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError(
                "FishTrainer does not support DeepSpeed or FSDP yet; fishckpt's sharded training is "
                "documented in docs/distributed.md. Train with DDP (plain torchrun) instead"
            )
        optim = str(getattr(args.optim, "value", args.optim))
        if optim not in _ADAMW:
            raise InvalidArgumentError(
                f"TrainingArguments.optim={optim!r}: FishTrainer trains with fishckpt.SparseAdamW (AdamW on the "
                f"masked entries only); use one of {list(_ADAMW)} (the default is {_ADAMW[0]!r} or fused)"
            )
        if args.push_to_hub and str(getattr(args.hub_strategy, "value", args.hub_strategy)) in (
            "checkpoint",
            "all_checkpoints",
        ):
            raise NotImplementedError(
                "hub_strategy='checkpoint'/'all_checkpoints' pushes checkpoint folders, which FishTrainer does "
                "not write; use hub_strategy='every_save' or 'end' (the model is pushed), or push the store"
            )
        if args.weight_decay:
            logger.warning(
                "fishckpt: weight_decay=%s applies to every masked entry, biases and LayerNorm weights included "
                "(the Trainer's AdamW exempts those); the FISH reference trains with weight_decay=0",
                args.weight_decay,
            )

    # Starting, resuming, finishing -----------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest step in the store, or None (no store yet, or no step saved).

        ``trainer.train(resume_from_checkpoint=trainer.latest_step())`` resumes when there is
        something to resume and starts afresh otherwise, like ``get_last_checkpoint`` in
        Hugging Face scripts.
        """
        if not CheckpointStore.is_store(self.store_location):
            return None
        steps = CheckpointStore.open(self.store_location).steps
        return steps[-1] if steps else None

    def train(
        self,
        resume_from_checkpoint: bool | int | str | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> Any:
        """Trains the mask, saving into the store; ``resume_from_checkpoint`` True or a step resumes from the store.

        Args:
            resume_from_checkpoint: None or False starts a run: it computes the mask (unless one
                was given) and creates the store, which must hold no step yet. True resumes from
                the store's latest step, an int from that step. A checkpoint folder path is refused:
                FishTrainer writes none.
            trial: Not supported (hyper-parameter search).
            ignore_keys_for_eval: As in ``Trainer.train``.

        Returns:
            The Trainer's ``TrainOutput``.

        Raises:
            InvalidArgumentError: Nothing to resume from, or a path given.
            StepExistsError: A run started on a store that holds steps already (a second ``train()``).
            StepNotFoundError: The step asked for is not saved.
            MaskMismatchError: ``mask=`` given on resume is not the store's.
        """
        if trial is not None:
            raise NotImplementedError("FishTrainer does not support hyper-parameter search (trial=)")
        step = self._step_to_resume(resume_from_checkpoint)
        if step is None:
            self._start_run()
            return self._run(None, ignore_keys_for_eval)
        with tempfile.TemporaryDirectory(prefix="fishckpt-resume-") as folder:
            self._start_resume(step, folder)
            return self._run(folder, ignore_keys_for_eval)

    def _run(self, folder: str | None, ignore_keys_for_eval: list[str] | None) -> Any:
        checkpointer = self.checkpointer
        assert checkpointer is not None
        try:
            result = super().train(resume_from_checkpoint=folder, ignore_keys_for_eval=ignore_keys_for_eval)
        except BaseException as error:
            checkpointer.__exit__(type(error), error, error.__traceback__)  # the pending save completes; logged
            raise
        finally:
            self._resume = None
        checkpointer.close()  # the last save is on disk when train() returns; its failure is raised here
        return result

    def _step_to_resume(self, value: bool | int | str | None) -> int | None:
        if value is None or value is False:
            return None
        if value is True:
            step = self.latest_step()
            if step is None:
                raise InvalidArgumentError(
                    f"resume_from_checkpoint=True, but {self.store_location} holds no step to resume from "
                    "(no store, or none saved yet); start with train(), or pass "
                    "resume_from_checkpoint=trainer.latest_step(), which is None when there is nothing to resume"
                )
            return step
        if isinstance(value, int):
            if value < 0:
                raise InvalidArgumentError(f"resume_from_checkpoint={value}: a step is a non-negative int")
            return value
        raise InvalidArgumentError(
            f"resume_from_checkpoint={value!r}: FishTrainer resumes from its fishckpt store "
            f"({self.store_location}), not from a checkpoint folder; pass True (the latest step) or a step number"
        )

    def _start_run(self) -> None:
        """Opens a fresh run: computes the mask and creates the store (on the main process; the others open it)."""
        if self.store is not None and self.store.steps:
            raise StepExistsError(
                f"this FishTrainer already trained into {self.store.location} (steps {self.store.steps}); call "
                "train(resume_from_checkpoint=True) to continue from its latest step, or make a new FishTrainer "
                "with another store= to start again"
            )
        with self.args.main_process_first(local=False, desc="fishckpt store"):
            if self.args.process_index == 0:
                self.store = self._create_store()
            else:
                self.store = CheckpointStore.open(self.store_location)
        self.mask = self.store.mask
        self.checkpointer = self._new_checkpointer(overwrite=False)

    def _create_store(self) -> CheckpointStore:
        exists = CheckpointStore.is_store(self.store_location)
        if exists:
            steps = CheckpointStore.open(self.store_location).steps
            if steps:
                raise StepExistsError(
                    f"{self.store_location} holds steps {steps} of an earlier run; resume it with "
                    "train(resume_from_checkpoint=True), or remove the store (or pass another store=) to start again"
                )
        mask = self._given_mask if self._given_mask is not None else self._compute_mask()
        # A store left by a run that never saved a step holds nothing to lose: it is replaced.
        return CheckpointStore.create(self.store_location, self.model, mask, overwrite=exists)

    def _start_resume(self, step: int, folder: str) -> None:
        if not CheckpointStore.is_store(self.store_location):
            raise InvalidArgumentError(f"no fishckpt store at {self.store_location} to resume from; start with train()")
        store = CheckpointStore.open(self.store_location)
        if self._given_mask is not None and self._given_mask.digest != store.mask.digest:
            raise MaskMismatchError(
                f"the mask given to FishTrainer is not the mask of {store.location}, which the run being resumed "
                "trained; drop mask= to resume (the store holds its mask), or start a new run with another store="
            )
        saved = store.info(step).metadata.get(HF_METADATA_KEY)
        if not isinstance(saved, Mapping) or not isinstance(saved.get("trainer_state"), Mapping):
            raise InvalidArgumentError(
                f"{store.location} step {step} holds no Trainer state (it was not saved by FishTrainer), so the "
                "Trainer cannot resume from it; load its weights with store.load_into(model, step) instead"
            )
        # The Trainer reads its state from <checkpoint>/trainer_state.json itself; everything else
        # comes from the store, through the _load_* overrides below.
        with open(os.path.join(folder, _TRAINER_STATE_NAME), "w", encoding="utf-8") as handle:
            json.dump(saved["trainer_state"], handle)
        self.store, self.mask = store, store.mask
        self._resume = _Resume(step, folder, dict(saved))
        # Steps after the one resumed from belong to the abandoned continuation: they are replaced.
        self.checkpointer = self._new_checkpointer(overwrite=True)
        logger.info("fishckpt: resuming from %s step %d", store.location, step)

    def _new_checkpointer(self, *, overwrite: bool) -> Checkpointer:
        assert self.store is not None
        limit = self.args.save_total_limit
        return Checkpointer(
            self.store,
            keep_last=limit if limit is not None and limit > 0 else None,
            rng=not self.args.save_only_model,
            overwrite=overwrite,
            check_outside_mask=self.check_outside_mask,
        )

    # The mask ------------------------------------------------------------------------------------------

    def _compute_mask(self) -> Mask:
        model = self.model
        head = self._head_patterns()
        self._check_head_fits(head)  # before the Fisher pass, which takes minutes on a real model
        examples = self._fisher_examples()
        with _vmappable_attention(model):
            scores = fisher_scores(
                model,
                examples,
                loss_fn=_model_loss,
                num_samples=self.fisher_samples,
                progress=not self.args.disable_tqdm,
            )
        mask = fish_mask(scores, keep_ratio=self.keep_ratio, always_trainable=head)
        logger.info(
            "fishckpt: FISH mask of %d entries (%.3f%% of %d), head %s",
            mask.k,
            100 * mask.density,
            mask.numel,
            head or "none",
        )
        return mask

    def _check_head_fits(self, head: list[str]) -> None:
        trainable = {name: p.numel() for name, p in self.model.named_parameters() if p.requires_grad}
        k = round(self.keep_ratio * sum(trainable.values()))
        covered = [name for name in trainable if any(fnmatch.fnmatchcase(name, pattern) for pattern in head)]
        size = sum(trainable[name] for name in covered)
        if size > k:
            how = "detected (the parameters outside the base model)" if self.head is None else "given"
            raise InvalidArgumentError(
                f"the head FishTrainer {how} has {size:,} entries ({', '.join(covered[:4])}"
                f"{', ...' if len(covered) > 4 else ''}), more than keep_ratio={self.keep_ratio} allows (k={k:,}); "
                "name a smaller head with head=[...] (head=[] for none), or raise keep_ratio"
            )

    def _head_patterns(self) -> list[str]:
        if self.head is not None:
            return self.head
        model = self.model
        names = [name for name, param in model.named_parameters() if param.requires_grad]
        prefix = getattr(model, "base_model_prefix", "")
        if prefix and isinstance(getattr(model, prefix, None), torch.nn.Module):
            outside = [name for name in names if not name.startswith(prefix + ".")]
        else:
            outside = [name for name in names if name.split(".", 1)[0] in _HEAD_MODULES]
        return [glob.escape(name) for name in outside]

    def _fisher_examples(self) -> Iterator[dict[str, Any]]:
        """``fisher_samples`` shuffled training examples, collated one by one, in batches of equal shapes.

        One example per collate call means no padding, so no attention mask is needed: an
        all-ones mask is dropped (Hugging Face models read a missing mask as all ones), which
        keeps ``fisher_scores`` on its vmap path. Every example drawn is used, so the grouping by
        shape changes no score.
        """
        loader = self.get_train_dataloader()  # the Trainer's dataset (unused columns removed) and collator
        dataset, collate = loader.dataset, loader.collate_fn
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise InvalidArgumentError(
                "FishTrainer draws a shuffled sample of train_dataset for the Fisher pass, which needs a "
                "map-style dataset (with __len__); compute the mask yourself (fishckpt.fisher_scores on "
                "shuffled batches, then fishckpt.fish_mask) and pass mask="
            )
        total = len(dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: self.fisher_samples]
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for index in order.tolist():
            example = dict(collate([dataset[index]]))
            attention = example.get("attention_mask")
            if isinstance(attention, torch.Tensor) and bool(attention.all()):
                del example["attention_mask"]
            key = tuple(
                (name, tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else (name, id(value))
                for name, value in example.items()
            )
            group = groups.setdefault(key, [])
            group.append(example)
            if len(group) == _FISHER_BATCH:
                yield self._batch(groups.pop(key))
        for group in groups.values():
            yield self._batch(group)

    def _batch(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        # Examples with a value other than a tensor are keyed apart (by its id), so come alone.
        if len(examples) == 1:
            return {key: self._to_device(value) for key, value in examples[0].items()}
        return {key: self._to_device(torch.cat([example[key] for example in examples])) for key in examples[0]}

    def _to_device(self, value: Any) -> Any:
        return value.to(self.args.device) if isinstance(value, torch.Tensor) else value

    # The optimizer and the clip ----------------------------------------------------------------------------

    def create_optimizer(self, model: Any = None) -> Any:
        """``SparseAdamW`` over the mask, with the learning rate, betas, epsilon and weight decay of the arguments."""
        if self.optimizer is None:
            if self.mask is None:
                raise InvalidArgumentError("the FISH mask is chosen when train() starts; call train()")
            args = self.args
            self._sparse_optimizer = SparseAdamW(
                self.model,
                self.mask,
                lr=args.learning_rate,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
                weight_decay=args.weight_decay,
            )
            self.optimizer = self._sparse_optimizer
        return self.optimizer

    def _clip_grad_norm(self, model: Any) -> torch.Tensor:
        """The Trainer's clip at ``max_grad_norm``, over the masked gradient entries only."""
        self.accelerator.unscale_gradients()  # fp16: the norm is of the true gradients; a no-op otherwise
        assert self.mask is not None
        return clip_masked_grad_norm_(self.model, self.mask, self.args.max_grad_norm)

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        if grad_norm is None:  # max_grad_norm <= 0: the norm is still logged, measured on the masked entries
            self.accelerator.unscale_gradients()
            assert self.mask is not None
            grad_norm = clip_masked_grad_norm_(self.model, self.mask, float("inf"))
        return grad_norm

    # Saving ------------------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Saves the step into the store (in the background) instead of writing a checkpoint folder."""
        checkpointer, store = self.checkpointer, self.store
        assert checkpointer is not None and store is not None
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        best = self.state.best_global_step
        if best and self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST):
            self.state.best_model_checkpoint = str(store.step_path(best))
            checkpointer.protect([best])
        # What the Trainer does before writing trainer_state.json: stateful callbacks (early stopping) record state.
        for callback in [*self.callback_handler.callbacks, self.control]:
            if isinstance(callback, ExportableState):
                name = type(callback).__name__
                if isinstance(self.state.stateful_callbacks[name], list):
                    self.state.stateful_callbacks[name].append(callback.state())
                else:
                    self.state.stateful_callbacks[name] = callback.state()
        only_model = self.args.save_only_model
        checkpointer.save(
            self.state.global_step,
            self.model,
            optimizer=None if only_model else self._sparse_optimizer,
            scheduler=None if only_model else self.lr_scheduler,
            metadata={HF_METADATA_KEY: self._step_metadata()},
        )

    def _step_metadata(self) -> dict[str, Any]:
        saved: dict[str, Any] = {"trainer_state": dataclasses.asdict(self.state)}
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            settings = config.to_dict()
            settings["architectures"] = [type(self.model).__name__]  # as save_pretrained writes it
            saved["config"] = settings
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and not self.args.save_only_model:
            saved["scaler"] = scaler.state_dict()
        return saved

    # Resuming from the store (the Trainer calls these with the folder _start_resume made) -----------------------

    def _resuming(self, checkpoint: str | None) -> _Resume | None:
        resume = self._resume
        return resume if resume is not None and checkpoint == resume.folder else None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        resume = self._resuming(resume_from_checkpoint)
        if resume is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[no-any-return]
        assert self.store is not None
        self.store.load_into(self.model if model is None else model, resume.step)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        resume = self._resuming(checkpoint)
        if resume is None:
            return super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[no-any-return]
        assert self.store is not None and self.checkpointer is not None
        try:
            self.store.load_training_state(resume.step, self._sparse_optimizer, self.lr_scheduler, rng=False)
        except StateMismatchError as error:
            raise InvalidArgumentError(
                f"{self.store.location} step {resume.step} holds the weights but no optimizer state (saved with "
                "save_only_model=True), so training cannot resume from it exactly; export it with "
                "fishckpt.hf.export_hf, or train with save_only_model=False to be able to resume"
            ) from error
        # The Trainer drops a best_model_checkpoint that is not a folder when it reads its state back.
        best = resume.saved["trainer_state"].get("best_model_checkpoint")
        if best is not None and self.state.best_global_step:
            self.state.best_model_checkpoint = best
            self.checkpointer.protect([self.state.best_global_step])

    def _load_scaler(self, checkpoint: str | None) -> None:
        resume = self._resuming(checkpoint)
        if resume is None:
            return super()._load_scaler(checkpoint)  # type: ignore[no-any-return]
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and isinstance(resume.saved.get("scaler"), Mapping):
            scaler.load_state_dict(dict(resume.saved["scaler"]))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # The Trainer calls this after fetching the first batches of the resumed epoch (creating the
        # DataLoader's iterator draws a seed from the global RNG, as it did at the epoch's start in the
        # interrupted run), so the forward passes draw the numbers they drew then.
        resume = self._resuming(checkpoint)
        if resume is None:
            return super()._load_rng_state(checkpoint)  # type: ignore[no-any-return]
        assert self.store is not None
        self.store.load_training_state(resume.step, rng=True)

    def _load_best_model(self) -> None:
        """Loads the best step (``load_best_model_at_end``) from the store into the model."""
        assert self.store is not None and self.checkpointer is not None
        step = self.state.best_global_step
        self.checkpointer.wait()  # the best step may be the save still in flight
        logger.info("fishckpt: loading the best model, step %d (%s)", step, self.state.best_metric)
        self.store.load_into(self.model, step)


def _model_loss(output: Any, batch: Any) -> torch.Tensor:
    """The model's own loss for one example (computed from the batch's labels), as the Trainer trains it."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise InvalidArgumentError(
            "the model returned no loss for a training example, so FishTrainer cannot score it: the Fisher "
            "pass needs examples with labels; or compute the mask yourself and pass mask="
        )
    return loss


@contextlib.contextmanager
def _vmappable_attention(model: Any) -> Iterator[None]:
    """Runs attention in "eager" mode for the block, put back after: torch.func has no vmap rule for SDPA on CPU."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    switch = getattr(model, "set_attn_implementation", None)
    if current in (None, "eager") or switch is None:
        yield
        return
    try:
        switch("eager")
    except Exception:  # a model that cannot switch is scored as it is (fisher_scores falls back to a loop)
        yield
        return
    try:
        yield
    finally:
        switch(current)
