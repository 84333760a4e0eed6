"""Autoregressive decoding: greedy or temperature/top-p sampling, stop tokens, KV cache, streaming, and
contrastive decoding (classifier-free guidance).

Works with any model whose forward has the :class:`~sensorium.backbone.model.Llama` signature
(``tokens``, ``pad_mask``, ``start``, ``last_only``) and ``setup_caches``/``clear_caches``; the composed
multimodal model implements the same interface.

Contrastive decoding follows CM3Leon's classifier-free guidance ("Scaling Autoregressive Multi-Modal
Models: Pretraining and Instruction Tuning", Yu et al. 2023): every step scores the next token twice, with
the conditioning (the prompt) and with a contrast prompt (for a composed model: the same prompt without its
media), and decodes from

    logits = (1 + α) · logits_with − α · logits_without  =  logits_with + α · (logits_with − logits_without)

on the raw last-position logits (the same choice as on log-probabilities: the two differ by one constant per
row, which changes neither the argmax nor the softmax). ``α = 0`` is plain decoding; tokens whose score the
conditioning raises gain, tokens the context alone would predict lose. Both halves run as one batch of
``2B`` rows with their own KV-cache rows, so a step costs one forward of ``2B`` rows.
"""

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch


def sample_next(
    logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids ``(B,)`` from last-position logits ``(B, vocab)``.

    Args:
        logits: scores of the next token.
        temperature: 0 means greedy (argmax).
        top_p: nucleus sampling mass (1.0 keeps every token).
        generator: random source for reproducible sampling.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)  # (B, 1)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_contrastive_alpha(alpha: float) -> float:
    """``alpha`` as a float; a negative or non-finite weight is a ``ValueError``."""
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"contrastive_alpha must be a finite number >= 0, got {alpha}")
    return alpha


def contrast_logits(with_cond: torch.Tensor, without_cond: torch.Tensor, alpha: float) -> torch.Tensor:
    """Guided scores ``(1 + alpha) * with_cond - alpha * without_cond`` (float32), for ``(B, vocab)`` logits.

    Written as ``with + alpha * (with - without)``, so a row whose two scores agree keeps them exactly.
    """
    w = with_cond.float()
    return w + alpha * (w - without_cond.float())


@torch.inference_mode()
def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    pad_id: int = 0,
    use_cache: bool = True,
    seed: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
    forward_kwargs: dict[str, Any] | None = None,
    contrastive_alpha: float = 0.0,
    contrastive_prompts: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Continue each prompt; return the new ids per prompt (stop token excluded).

    Args:
        model: a backbone or composed model (see the module docstring).
        prompts: token ids per sequence; a batch is left-padded.
        max_new_tokens: most tokens to add per sequence.
        temperature: 0 for greedy decoding.
        top_p: nucleus sampling mass.
        stop_ids: ids that end a sequence.
        pad_id: id written into padding slots (never attended to).
        use_cache: keep a KV cache; without it the whole sequence is recomputed every step.
        seed: seed for sampling.
        on_token: called as ``on_token(row, token_id)`` for every new token, for streaming.
        forward_kwargs: extra keyword arguments for every forward call (media inputs of composed models; with
            contrastive decoding they must cover the ``2B`` rows ``prompts + contrastive_prompts``).
        contrastive_alpha: guidance weight ``α`` (see the module docstring); 0 (the default) is plain decoding
            and ignores ``contrastive_prompts``.
        contrastive_prompts: one contrast prompt per prompt (a composed model passes the prompt without its
            media); they run as rows ``B..2B-1`` of the same batch and receive the same new tokens.
    """
    assert prompts and all(len(p) > 0 for p in prompts), "every prompt needs at least one token"
    alpha = check_contrastive_alpha(contrastive_alpha)
    guided = alpha != 0 and contrastive_prompts is not None
    if guided:
        assert len(contrastive_prompts) == len(prompts), (
            f"{len(contrastive_prompts)} contrast prompts for {len(prompts)} prompts: give one per prompt"
        )
        assert all(len(p) > 0 for p in contrastive_prompts), "every contrast prompt needs at least one token"
    rows = [*prompts, *contrastive_prompts] if guided else list(prompts)
    device = next(model.parameters()).device
    B, R, L = len(prompts), len(rows), max(len(p) for p in rows)
    tokens = torch.full((R, L + max_new_tokens), pad_id, dtype=torch.long, device=device)  # (R, L + N), R = B or 2B
    pad_mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i, p in enumerate(rows):
        tokens[i, L - len(p) : L] = torch.tensor(list(p), dtype=torch.long)
        pad_mask[i, L - len(p) : L] = True
    padded = any(len(p) != L for p in rows)
    stops = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    kwargs = dict(forward_kwargs or {})
    if use_cache:
        model.setup_caches(R, L + max_new_tokens)
    try:
        end = L
        for step in range(max_new_tokens):
            if use_cache:
                begin = 0 if step == 0 else end - 1
                logits = model(
                    tokens[:, begin:end], pad_mask=pad_mask[:, :end] if padded else None, start=begin,
                    last_only=True, **kwargs,
                )
            else:
                logits = model(tokens[:, :end], pad_mask=pad_mask[:, :end] if padded else None, last_only=True, **kwargs)
            scores = logits[:, -1]  # (R, vocab)
            if guided:
                scores = contrast_logits(scores[:B], scores[B:], alpha)  # (B, vocab)
            nxt = sample_next(scores, temperature=temperature, top_p=top_p, generator=generator)  # (B,)
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            tokens[:, end] = nxt.repeat(R // B)  # the contrast half continues with the same tokens
            pad_mask[:, end] = (~finished).repeat(R // B)
            for i in range(B):
                if not finished[i] and not bool(torch.isin(nxt[i], stops)):
                    out[i].append(int(nxt[i]))
                    if on_token is not None:
                        on_token(i, int(nxt[i]))
            finished |= torch.isin(nxt, stops)
            padded = padded or bool(finished.any())
            end += 1
            if bool(finished.all()):
                break
    finally:
        if use_cache:
            model.clear_caches()
    return out


class TextStreamer:
    """Prints decoded text as tokens arrive (whole characters only), for one sequence.

    Args:
        decode: ids → text.
        write: where text goes (``sys.stdout.write`` with a flush by default).
    """

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], Any] | None = None) -> None:
        import sys

        self.decode = decode
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, row: int, token_id: int) -> None:
        if row != 0:
            return
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        self.write(text[self.printed :])
        self.printed = len(text)
