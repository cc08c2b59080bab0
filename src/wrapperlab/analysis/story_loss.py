"""Where a story model's held-out loss comes from (paper §5.2, Figs. 11b/33: "never reach the same loss").

The revival claim compares the held-out LM loss on stories with the feature (Twist) between the deleted models
after reFT and the model that never saw the feature. That loss averages every token of a text — the instruction
lines, the feature's own sentence and the rest of the story — so a model can lose on it through general language
damage while writing the feature well, or win on it while never writing the feature. This analysis splits the
per-token cross-entropy of ``n`` test-split texts into those parts, for texts with the feature and without it (the
same split, the same texts for every model: they depend on ``seed`` only). The feature's sentences are located by
the procedural checker's phrasings (``tasks.stories.feature_spans``); a token belongs to them when its characters
overlap one. Each text is scored alone, BOS first, in fp32; a text longer than the model's context is scored in
consecutive windows (every token predicted once). The ``all`` part is therefore close to, not equal to, the
training-time ``heldout_loss`` (random windows of a stream of Twist texts, each with the previous text as context).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from wrapperlab.analysis.common import AnalysisError, Result, Settings

PARTS = ("all", "instruction", "feature sentence", "rest of story")


class StoryLossSettings(Settings):
    n: int = Field(200, ge=1, description="texts per set (with / without the feature), at most the split's")
    seed: int = Field(0, ge=0)
    batch: int = Field(32, ge=1)


def token_parts(tokenizer, text: str, story_start: int, spans: list[tuple[int, int]]) -> tuple[list[int], list[str]]:
    """The ids of ``text`` with BOS first, and the part of each id after BOS: "instruction" before the character
    ``story_start``, "feature sentence" when it overlaps a character span of ``spans`` (offsets in the text),
    "rest of story" otherwise."""
    ids, offs = tokenizer.spans(text)
    parts = []
    for b, e in offs:
        e = max(e, b + 1)  # a zero-width piece (part of a multi-byte character) belongs to the character at b
        if any(b < se and e > ss for ss, se in spans):
            parts.append("feature sentence")
        elif e <= story_start:
            parts.append("instruction")
        else:
            parts.append("rest of story")
    return [tokenizer.bos_id] + ids, parts


def windows(ids: list[int], parts: list[str], seq_len: int) -> list[tuple[list[int], list[str]]]:
    """Consecutive windows of at most ``seq_len`` inputs: window k feeds ids[k*seq_len : (k+1)*seq_len + 1] and
    predicts each of its tokens after the first, so every token after BOS is predicted exactly once."""
    return [(ids[k:k + seq_len + 1], parts[k:k + seq_len]) for k in range(0, len(ids) - 1, seq_len)]


@torch.no_grad()
def part_losses(model, seqs: list[tuple[list[int], list[str]]], seq_len: int, batch: int = 32) -> dict[str, list]:
    """Per part, the cross-entropy of every token predicted (token i+1 from the prefix through i), pooled over all
    sequences (a sequence longer than ``seq_len`` in consecutive windows); ``all`` holds every token."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out: dict[str, list] = {p: [] for p in PARTS}
    seqs = [w for ids, parts in seqs for w in windows(ids, parts, seq_len)]
    for i in range(0, len(seqs), batch):
        chunk = seqs[i:i + batch]
        width = max(len(ids) for ids, _ in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)  # right padding: causal, so it never reaches a token
        for j, (ids, _) in enumerate(chunk):
            x[j, :len(ids)] = torch.tensor(ids)
        logits = model(x[:, :-1].to(device)).float()
        ce = F.cross_entropy(logits.transpose(1, 2), x[:, 1:].to(device), reduction="none").cpu()
        for j, (ids, parts) in enumerate(chunk):
            for k, part in enumerate(parts[:len(ids) - 1]):
                v = float(ce[j, k])
                out["all"].append(v)
                out[part].append(v)
    model.train(was)
    return out


def story_loss(model, tokenizer, records, feature: str, seq_len: int, *,
               settings: StoryLossSettings | None = None, label: str = "model") -> Result:
    """Rows: model, stories ("with F" / "without F"), part, loss (mean nats per token), tokens, texts."""
    from wrapperlab.tasks.stories import feature_spans, make_text

    s = settings or StoryLossSettings()
    rows = []
    for name, keep in ((f"with {feature}", True), (f"without {feature}", False)):
        pool = [r for r in records if (feature in r.features) == keep]
        if not pool:
            raise AnalysisError(f"records: none {name}")
        rng = np.random.default_rng([s.seed, 21, int(keep)])
        pick = [pool[int(i)] for i in sorted(rng.choice(len(pool), size=min(s.n, len(pool)), replace=False))]
        seqs = []
        for i, r in enumerate(pick):
            text = make_text(r, np.random.default_rng([s.seed, 22, i]))
            story = r.story.strip()
            start = len(text) - len(story)
            spans = [(start + a, start + b) for a, b in feature_spans(story, feature)] if keep else []
            seqs.append(token_parts(tokenizer, text, start, spans))
        got = part_losses(model, seqs, seq_len, s.batch)
        for part in PARTS:
            if got[part]:
                rows.append({"model": label, "stories": name, "part": part, "loss": float(np.mean(got[part])),
                             "tokens": len(got[part]), "texts": len(pick)})
    return Result("story_loss", rows, {"settings": s.to_dict(), "feature": feature})


def story_loss_run(run_dir: str | Path, *, settings: StoryLossSettings | None = None, device: str = "cpu") -> Result:
    """:func:`story_loss` of a finished story run on its test split, for the run's feature."""
    from wrapperlab.analysis.evaluate import load_story_run

    run_dir = Path(run_dir)
    _, task, model, side = load_story_run(run_dir, device, "story_loss")
    res = story_loss(model, task.tokenizer, task.split["test"], task.config.feature, task.seq_len,
                     settings=settings, label=run_dir.name)
    res.meta.update({"run_id": side["run_id"], "run_dir": str(run_dir)})
    return res
