"""A run's records: the released model, resumable checkpoints, metrics logs, evaluation rows.

``RecordsMixin`` is the part of ``Trainer`` that writes to the run folder. Under several processes only
rank 0 writes (checkpoints, ``metrics.jsonl``, TensorBoard, the model); every rank still calls these
methods at the same points, because gathering state (RNG of every rank, skipped images) and waiting for
rank 0 to finish writing are collective.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from . import state as ckpt
from .config import RESUME_DEFAULTS, RESUME_FIXED, TrainEvent, TrainingError


class RecordsMixin:
    """Checkpoints, logs and evaluation rows (attributes are set by ``Trainer.__init__``)."""

    # -- checkpoints ----------------------------------------------------------------------
    def _save_model(self, folder: Path) -> None:
        """The model in its released format: compressor checkpoint, or a plain transformers folder."""
        model = self.model
        if self.config.objective == "pretrain":
            model.backbone.hf.save_pretrained(folder)
            model.backbone.processor.save_pretrained(folder)
            return
        base_trained = self.parts["projector"] or self.parts["llm"] or self.config.train_vision_tower
        if base_trained:  # the stored base changed: its signature must describe the new weights
            model.config.base_signature = model.backbone.signature()
        model.save_pretrained(str(folder), include_base=True if base_trained else None)

    def _save_final(self, folder: Path) -> None:
        """The released model, replaced atomically, with a short card (cards are not fingerprinted)."""
        import shutil
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=self.out))
        try:
            self._save_model(tmp / "model")
            (tmp / "model" / "README.md").write_text(self._card())
            old = folder.with_name(".model-old")
            shutil.rmtree(old, ignore_errors=True)
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp / "model", folder)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.model.compressor is not None:
            self.model.source = str(folder)

    def _card(self) -> str:
        cfg = self.config
        what = ("a Fwd2Bot compressor checkpoint (load with `Fwd2Bot.from_pretrained`)" if cfg.objective == "fwd2bot"
                else "a LLaVA base model pretrained for captioning / QA (a transformers folder)")
        last_eval = self.evals[-1] if self.evals else {}
        lines = [f"# {Path(self.out).name}", "", f"This folder is {what}, trained by fwd2bot-index.", "",
                 f"- objective: {cfg.objective}; started from: {cfg.model}", f"- data: {', '.join(cfg.data)}",
                 f"- optimizer steps: {self.step}; samples seen: {self.samples_seen}; batch {cfg.batch_size} x "
                 f"accumulation {cfg.grad_accum}; lr {cfg.lr}", f"- pooling schedule: {self.schedule.to_list()}",
                 "- stored summary tokens per image: "
                 + (f"nested budgets {', '.join(map(str, self.budgets))} (any of them: f2b index --tokens k)"
                    if getattr(self, "budgets", None) else f"{self.model.config.num_summary_tokens or 'none'}"),
                 f"- trained parts: {', '.join(k for k, v in self.parts.items() if v)}"
                 + (", vision tower" if cfg.train_vision_tower else ""),
                 f"- held-out evaluation at the end: {json.dumps({k: v for k, v in last_eval.items() if k != 'kind'})}",
                 f"- images skipped as unreadable: {len(self.loader.skipped)}", ""]
        from ..model_card import train_eval_results, with_front_matter

        data = ", ".join(Path(d).name for d in cfg.data)
        return with_front_matter("\n".join(lines), Path(self.out).name, base_model=cfg.model, datasets=cfg.data,
                                 eval_results=train_eval_results(last_eval, data))

    def _all_skipped(self) -> dict[str, str]:
        """Unreadable images met by any rank (collective)."""
        merged: dict[str, str] = {}
        for part in self.distributed.gather_objects(dict(self.loader.skipped)):
            merged.update(part)
        return merged

    def _state(self) -> dict[str, Any]:
        """The trainer state to save (collective: every rank's RNG and skipped images are gathered)."""
        rngs = self.distributed.gather_objects(ckpt.rng_state())
        state = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "position": self.plan.position(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs[0],
            "skipped": self._all_skipped(),
            "evals": json.dumps(self.evals),
            "elapsed_s": self._elapsed_before + (time.perf_counter() - self._started),
            "config": json.dumps(self.config.to_dict()),
            "world_size": self.distributed.world,
        }
        if self.distributed.enabled:
            state["rng_ranks"] = rngs
        return state

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` (rank 0; the other ranks wait until it is complete)."""
        state = self._state()
        path = ckpt.checkpoint_dir(self.out / "checkpoints", self.step)
        if self.distributed.is_main:
            path = ckpt.write_checkpoint(self.out / "checkpoints", self.step, self._save_model, state,
                                         keep=self.config.keep_checkpoints)
            self._emit(TrainEvent("checkpoint", self.step, path=str(path)))
        self.distributed.barrier()
        return path

    def _restore(self, folder: Path) -> None:
        state = ckpt.read_state(folder)
        # a setting the saved run does not record did not exist yet: it ran with that setting's default
        saved = {**RESUME_DEFAULTS, **json.loads(state["config"])}
        now = self.config.to_dict()
        for settings in (saved, now):  # the same files, named from another working folder, are the same data
            settings["data"] = [str(Path(d).resolve()) for d in settings.get("data") or []]
        differs = [k for k in RESUME_FIXED if saved.get(k) != now.get(k)]
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.distributed.world:
            differs.append(f"processes: {saved_world} -> {self.distributed.world} (the global batch is batch_size "
                           "x processes; launch with the same --nproc_per_node)")
        if differs:
            detail = ", ".join(k if k.startswith("processes") else f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
                           for k in differs)
            raise TrainingError(f"cannot resume from {folder}: settings changed ({detail}); resume with the "
                                f"settings of {self.out / 'train_config.json'} or start a new run")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.plan.restore(state["position"])
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.loader.skipped.update(state["skipped"])
        self.evals = json.loads(state["evals"])
        self._elapsed_before = float(state["elapsed_s"])
        ranks = state.get("rng_ranks")
        ckpt.set_rng_state(ranks[self.distributed.rank] if ranks else state["rng"])
        self.resumed_from = str(folder)

    # -- logging ----------------------------------------------------------------------------
    def _emit(self, event: TrainEvent) -> None:
        if not self.distributed.is_main:
            return
        for callback in self.callbacks:
            callback(event)

    def _log(self, row: dict[str, Any]) -> None:
        if not self.distributed.is_main:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            prefix = "eval/" if row.get("kind") == "eval" else "train/"
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self._tb.add_scalar(prefix + k, v, row["step"])

    def _open_logs(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.distributed.is_main:
            return
        (self.out / "train_config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        metrics = self.out / "metrics.jsonl"
        if self.resumed_from is not None and metrics.is_file():  # drop rows past the checkpoint: they are redone
            rows = [line for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            metrics.write_text("".join(r + "\n" for r in rows))
        elif self.resumed_from is None and metrics.is_file():
            metrics.unlink()
        if self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard is not installed (pip install tensorboard); metrics go to "
                              "metrics.jsonl only", stacklevel=2)

    def _run_eval(self) -> dict[str, Any]:
        """Held-out evaluation on rank 0; every rank receives its row, so all keep the same ``evals``."""
        result = self.evaluate() if self.distributed.is_main else {}
        result = self.distributed.broadcast(result)
        if result:
            row = {"kind": "eval", "step": self.step, **result}
            self.evals.append(row)
            self._log(row)
            self._emit(TrainEvent("eval", self.step, row))
        return result

