"""The learnt reducer (``reduce="learnt"``): each segment's token from its frames by a small
module trained jointly with the LoRA.

``lalmtool finetune --segments SEG`` trains it (on frames and their boundaries, with the
decoder's loss) and saves it into the adapter directory (its weights in ``pooler.safetensors``,
its shape in the adapter's ``lalmtool.json``: ``lalmtool.trained``); ``lalmtool pool --reduce
learnt --pooler ADAPTER`` then writes the pooled store that ``decode`` reads with that adapter,
like any other condition.

A segment's token is

* per head (a slice of ``dim / heads`` feature dimensions), a softmax-weighted mean of the
  segment's frames, each frame's score a linear function of the frame plus a bias for its
  place in the segment (attention pooling);
* plus a low-rank map of the segment's frames stacked in order (``rank`` dimensions; the
  frame at place ``j`` of the segment goes through its own ``dim x rank`` down-projection,
  places from ``width - 1`` on share the last one), projected back to ``dim``.

Scores and the up-projection start at zero, so before training the token is exactly the
segment's mean (``reduce="mean"``): training only moves away from uniform average pooling.
"""
from __future__ import annotations

import math
import os

import torch

from . import trained

WEIGHTS_FILE = "pooler.safetensors"


class LearntPooler(torch.nn.Module):
    """Attention pooling plus a low-rank stacked-frames term, per segment (module doc)."""

    def __init__(self, dim: int, heads: int = 8, rank: int = 64, width: int = 10):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"pooler heads={heads}: must be >= 1 and divide the feature "
                             f"dimension {dim}")
        if rank < 0 or width < 1:
            raise ValueError(f"pooler rank={rank}, width={width}: need rank >= 0, width >= 1")
        self.config = {"dim": dim, "heads": heads, "rank": rank, "width": width}
        self.score = torch.nn.Linear(dim, heads)
        self.place = torch.nn.Parameter(torch.zeros(width, heads))
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)
        self.down = torch.nn.Parameter(torch.empty(dim, width, rank).uniform_(
            -1 / math.sqrt(dim * width), 1 / math.sqrt(dim * width)))
        self.up = torch.nn.Parameter(torch.zeros(rank, dim))

    @property
    def size(self) -> int:
        """Its number of parameters (what it adds to the LoRA's)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, z: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Tokens ``[S, D]`` (float32) of frames ``z`` ``[T, D]`` cut at ``starts`` (the first
        frame of each segment, as ``lalmtool segment`` stores them); in float32 under any
        autocast."""
        with torch.autocast(z.device.type, enabled=False):
            return self._tokens(z.float(), starts)

    def _tokens(self, x: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        c = self.config
        n, dim, heads = len(x), c["dim"], c["heads"]
        starts = starts.to(device=x.device, dtype=torch.int64)
        lengths = torch.diff(starts, append=torch.tensor([n], device=x.device))
        seg = torch.repeat_interleave(torch.arange(len(starts), device=x.device), lengths)
        place = (torch.arange(n, device=x.device) - starts[seg]).clamp(max=c["width"] - 1)
        scores = self.score(x) + self.place[place]  # [T, H]
        top = torch.full((len(starts), heads), -torch.inf, device=x.device).scatter_reduce(
            0, seg[:, None].expand(-1, heads), scores, "amax")
        w = torch.exp(scores - top[seg])
        w = w / torch.zeros_like(top).index_add(0, seg, w)[seg]
        tokens = torch.zeros(len(starts), heads, dim // heads, device=x.device).index_add(
            0, seg, w[..., None] * x.view(n, heads, dim // heads)).reshape(len(starts), dim)
        if c["rank"]:
            low = (x @ self.down.reshape(dim, -1)).view(n, c["width"], c["rank"])
            low = low[torch.arange(n, device=x.device), place]  # [T, rank]
            tokens = tokens + torch.zeros(len(starts), c["rank"], device=x.device).index_add(
                0, seg, low) @ self.up
        return tokens


def save(pooler: LearntPooler, directory: str) -> None:
    """Writes the pooler's weights into ``directory``: an adapter directory being written whole
    (``fileio.atomic_dir``); its shape goes into the adapter's record, ``pooler.config``."""
    from safetensors.torch import save_file

    save_file({k: v.detach().float().cpu().contiguous() for k, v in
               pooler.state_dict().items()}, os.path.join(directory, WEIGHTS_FILE))


def shape(directory: str | None) -> dict | None:
    """The shape of the learnt pooler the adapter ``directory`` holds (its record's
    ``pooler``), or None when it holds none."""
    record = trained.read(directory)
    return record.get("pooler") if record else None


def has_pooler(directory: str | None) -> bool:
    return shape(directory) is not None


def load(directory: str) -> LearntPooler:
    """The pooler a finetune run saved into ``directory`` (its adapter), in eval mode."""
    from safetensors.torch import load_file

    record = trained.read(directory)
    if not (record and record.get("pooler") is not None):
        raise ValueError(f"--pooler {directory} holds no learnt pooler (none in its "
                         f"{trained.RECORD_FILE}); give the adapter directory of a `lalmtool "
                         "finetune --segments ...` run (it trains the learnt pooler)")
    held, source = record["pooler"], record.source("pooler")
    weights = os.path.join(directory, WEIGHTS_FILE)
    try:
        pooler = LearntPooler(**held)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--pooler {directory}: {source} cannot be read as the pooler's shape "
                         f"({type(e).__name__}: {str(e).splitlines()[0]}); copy the adapter "
                         "again whole, or train it again") from e
    try:
        pooler.load_state_dict(load_file(weights))
    except Exception as e:  # noqa: BLE001 - safetensors and torch raise several kinds
        raise ValueError(f"--pooler {directory}: {weights} does not hold a pooler of the shape "
                         f"{os.path.basename(source)} gives ({held}) or is damaged "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0]}); copy the "
                         "adapter again whole, or train it again") from e
    return pooler.eval()


def check_boundaries(directory: str, seg_meta: dict, where: str) -> None:
    """Refuses boundaries of another kind or rate than the pooler in ``directory`` was trained
    on (its record's compression; adapters from before it are taken as they are)."""
    steps = ((trained.read(directory) or {}).get("compression") or {}).get("steps") or []
    if not steps:
        return
    trained_on = (steps[-1]["method"], {k: v for k, v in steps[-1].get("params", {}).items()})
    given = (seg_meta.get("method"), {k: v for k, v in (seg_meta.get("params") or {}).items()
                                      if k != "target_rate"})
    if trained_on != given:
        def name(method, params):
            return "-".join([method, *(f"{k}={v:g}" for k, v in sorted(params.items()))])
        raise ValueError(f"the pooler of {directory} was trained on {name(*trained_on)} "
                         f"boundaries, {where} holds {name(*given)} ones: pool the boundaries "
                         "it was trained on (or train a pooler on these)")


def weights_identity(directory: str) -> dict:
    """The content identity of a saved pooler (what pooled stores and decode compare)."""
    from . import record

    return record.identity(os.path.join(directory, WEIGHTS_FILE))
