"""The user preference recurrence: an RNN over the chronological history, one window at a time.

Each window of W items (overlapping the previous one by O) is summarised as a short-term
interest; the first one becomes the long-term preference and every later one is merged into it
(the merge is the recurrence's update). The short-term interests are kept. Only the merges form a
chain: a window's interest needs nothing but its items, so the next windows' interests are asked
for while the chain merges (`extract.interests_ahead`), which halves a user's dependent calls.

Horizons (what the preference may have seen, by the target it serves):
- `train`: the training items, i.e. the history without its last two items (the retriever's
  user token starts from it; it has seen neither the valid nor the test target);
- `valid`: the history before the valid target, which is the same items, so the same state;
- `test`: the history before the test target (the training items and the valid target),
  continued from the `train` state with the one extra item, not started again.

A walk also keeps its trajectory: the long-term preference after every window, with the window's
end (`trajectory`, `trajectory_ends`): the state a user's preference was in before any item of
their history, which is what a ranker trained on earlier targets may show (never a state that has
seen its target).

A walk stores its resume point: the state after its last *complete* window (`settled_*`).
Windows lie on a fixed grid (see `windows.py`), so continuing from the resume point over a longer
history gives what a fresh walk over that history gives, while calling the LLM only for the
windows that changed. `--incremental` and the `test` horizon both continue this way.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cotrec.config import ExtractConfig
from cotrec.extract.concurrency import start_eagerly
from cotrec.extract.prompts import Domain, merge_preference, short_term_interest
from cotrec.extract.steps import StepStats, Steps, describe_failure, is_context_overflow
from cotrec.extract.windows import capped_start, history_digest, stride, window_bounds

HORIZONS = ("train", "valid", "test")


@dataclass(slots=True)
class WalkState:
    """Where a user's recurrence stands after walking items [start, items_consumed)."""

    start: int = 0
    items_consumed: int = 0
    windows: int = 0
    preference: str | None = None
    short_terms: list[str] = field(default_factory=list)
    # The resume point: the state after the last complete (W-item) window.
    settled_windows: int = 0
    settled_preference: str | None = None
    # (end of the window, the preference after it), one per window walked
    trajectory: list[tuple[int, str | None]] = field(default_factory=list)


async def summarise_windows(steps: Steps, domain: Domain, windows: list[list[str]], budget: int,
                            stats: list[StepStats]) -> list[str | None]:
    """Short-term interests of windows that depend on nothing, in one engine call (`stats[i]` counts
    window i's calls); a prompt over the context drops its window's oldest items first."""
    replies = await steps.texts([short_term_interest(domain, labels) for labels in windows], budget, stats)
    interests = []
    for labels, (text, reply), counted in zip(windows, replies, stats):
        if not text and is_context_overflow(reply) and len(labels) > 1:
            [text] = await summarise_windows(steps, domain, [labels[len(labels) // 2:]], budget, [counted])
        elif not text:
            counted.fail(f"short-term interest: {describe_failure(reply)}")
        interests.append(text or None)
    return interests


def walk_bounds(state: WalkState, length: int, config: ExtractConfig) -> list[tuple[int, int]]:
    """The windows a walk from `state`'s resume point over history[:length] summarises, in order."""
    first = state.start + state.settled_windows * (config.window - config.overlap)
    return window_bounds(first, length, config.window, config.overlap)


def settled_after(state: WalkState, bounds: list[tuple[int, int]], config: ExtractConfig) -> int:
    """The resume point (windows) after walking `bounds` from `state`: its last complete window."""
    complete = [k + 1 for k, (begin, end) in enumerate(bounds) if end - begin == config.window]
    return state.settled_windows + complete[-1] if complete else state.settled_windows


class Interests:
    """A user's short-term interests, asked for ahead of the merge chain.

    A window's short-term interest depends only on its items, never on the preference so far, so
    only the merges form a chain. While the chain merges window k, the interests of the next
    `ahead` windows are already with the engine, batched with other users' steps: a user's
    critical path shrinks from a call per window plus a call per merge to about a call per merge,
    and the engine holds more sequences at once. The first window, asked before anything else, goes
    in one engine call with the windows ahead of it. `ahead=0` walks strictly one call at a time.
    """

    def __init__(self, steps: Steps, domain: Domain, labels_of: Any, history: list[int], config: ExtractConfig):
        self.steps, self.domain, self.labels_of, self.history = steps, domain, labels_of, history
        self.budget, self.ahead = config.interest_tokens, config.interests_ahead
        self.planned: list[tuple[int, int, StepStats]] = []  # (begin, end, whose stats it counts to), walk order
        self.asked = 0  # windows [0, asked) of `planned` are asked for (walks get them in order)
        self.tasks: dict[int, asyncio.Future] = {}  # windows (indices into `planned`) being asked ahead
        self.ready: dict[int, str | None] = {}  # windows whose interest came with an earlier call

    def plan(self, bounds: list[tuple[int, int]], stats: StepStats) -> range:
        """Add a walk's windows; returns their indices (what `walk` goes through)."""
        first = len(self.planned)
        self.planned += [(begin, end, stats) for begin, end in bounds]
        return range(first, len(self.planned))

    def _summarise(self, indices: range) -> Any:
        windows = [self.planned[i] for i in indices]
        history, labels_of = self.history, self.labels_of
        return summarise_windows(self.steps, self.domain, [labels_of(history[b:e]) for b, e, _ in windows],
                                 self.budget, [stats for _, _, stats in windows])

    async def get(self, index: int) -> str | None:
        end = min(index + 1 + self.ahead, len(self.planned))  # this window and the ones ahead of it
        if index >= self.asked:  # nothing asked yet: all of them, in one call
            asked, self.asked = range(index, end), end
            self.ready.update(zip(asked, await self._summarise(asked)))
        elif end > self.asked:  # this one was asked earlier: each of the ones ahead not yet asked, started now
            for i in range(self.asked, end):
                self.tasks[i] = start_eagerly(self._summarise(range(i, i + 1)))
            self.asked = end
        if index in self.ready:
            return self.ready.pop(index)
        [interest] = await self.tasks.pop(index)
        return interest

    def cancel(self) -> None:
        for task in self.tasks.values():
            task.cancel()


async def walk(steps: Steps, domain: Domain, interests: Interests, windows: range, state: WalkState, length: int,
               config: ExtractConfig, stats: StepStats) -> WalkState:
    """Continue `state` from its resume point over history[:length]; returns the new state.
    `windows`: where `interests` planned this walk's windows (`walk_bounds(state, length, config)`)."""
    settled_windows, preference = state.settled_windows, state.settled_preference
    short_terms = state.short_terms[:settled_windows]
    trajectory = state.trajectory[:settled_windows]
    settled_preference = preference
    for index in windows:
        begin, end, _ = interests.planned[index]
        interest = await interests.get(index)
        short_terms.append(interest or "")
        if interest is not None:
            if preference is None:
                preference = interest
            else:
                merged, reply = await steps.text(merge_preference(domain, preference, interest),
                                                 config.preference_tokens, stats)
                if merged:
                    preference = merged
                else:
                    stats.fail(f"merge: {describe_failure(reply)}")
        trajectory.append((end, preference))
        if end - begin == config.window:
            settled_windows, settled_preference = len(short_terms), preference
    return WalkState(start=state.start, items_consumed=length, windows=len(short_terms),
                     preference=preference, short_terms=short_terms, settled_windows=settled_windows,
                     settled_preference=settled_preference, trajectory=trajectory)


def prior_state(row: dict[str, Any], history: list[int], train_length: int) -> WalkState | None:
    """The stored `train` state to continue from, when it was made from a prefix of this history."""
    consumed = row.get("prior_items_consumed")
    if consumed is None or (isinstance(consumed, float) and np.isnan(consumed)):
        return None
    consumed = int(consumed)
    if consumed > train_length or history_digest(history[:consumed]) != row.get("prior_consumed_digest"):
        return None
    ends, states = row.get("prior_trajectory_ends"), row.get("prior_trajectory")
    if ends is None or states is None or len(ends) != int(row["prior_windows"]):  # a row from before trajectories
        return None
    return WalkState(start=int(row["prior_history_start"]), items_consumed=consumed,
                     windows=int(row["prior_windows"]), preference=row["prior_preference"],
                     short_terms=list(row["prior_short_term"]), settled_windows=int(row["prior_settled_windows"]),
                     settled_preference=row["prior_settled_preference"],
                     trajectory=[(int(e), p or None) for e, p in zip(ends, states)])


async def user_program(row: dict[str, Any], ctx: Any) -> list[dict[str, Any]]:
    """All three horizons of one user: walk the training items, then continue for `test`."""
    config: ExtractConfig = ctx.config
    history = row["history"]  # item indices, as a list (slices and labels cost less than numpy's)
    history = history.tolist() if isinstance(history, np.ndarray) else list(history)
    n = len(history)
    train_length = n - 2
    train_stats, stats = StepStats(), StepStats()  # the train walk's calls; the test walk's
    state = prior_state(row, history, train_length) if ctx.incremental else None
    continued = state is not None
    if state is None:
        state = WalkState(start=capped_start(train_length, config.window, config.overlap, config.max_windows))
    # Both walks' windows are known before any call (the grid fixes them), so the test walk's
    # interests can be asked for while the train walk still merges.
    train_bounds = walk_bounds(state, train_length, config)
    test_from = WalkState(start=state.start, settled_windows=settled_after(state, train_bounds, config))
    interests = Interests(ctx.steps, ctx.domain, ctx.labels_of, history, config)
    train_windows = interests.plan(train_bounds, train_stats)
    test_windows = interests.plan(walk_bounds(test_from, n - 1, config), stats)
    try:
        train = await walk(ctx.steps, ctx.domain, interests, train_windows, state, train_length, config, train_stats)
        test = await walk(ctx.steps, ctx.domain, interests, test_windows, train, n - 1, config, stats)
    finally:
        interests.cancel()  # none left running when a step raised
    source = row.get("source_digest") or history_digest(history)  # the runner's rows carry it
    user = int(row["user_idx"])
    train_row = horizon_row(user, "train", train, history, history[n - 2], train_stats, train_stats.errors, continued, source)
    # `valid` sees the same items as `train`, so it is the same state; its calls were train's.
    valid_row = {**train_row, "horizon": "valid", "calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
    test_row = horizon_row(user, "test", test, history, history[n - 1], stats, train_stats.errors + stats.errors,
                           continued, source)
    return [train_row, valid_row, test_row]


def horizon_row(user: int, horizon: str, walked: WalkState, history: list[int], target: int, spent: StepStats,
                failures: list[str], continued: bool, source: str) -> dict[str, Any]:
    """One output row of the users table (docs/design.md): the state a horizon's walk ended in."""
    return {
        "user_idx": user, "horizon": horizon,
        "preference": walked.preference or "",
        "short_term": walked.short_terms,
        "windows": walked.windows, "items_consumed": walked.items_consumed,
        "history_start": walked.start, "target_item_idx": int(target),
        "settled_windows": walked.settled_windows, "settled_preference": walked.settled_preference,
        "trajectory_ends": [end for end, _ in walked.trajectory],
        "trajectory": [text or "" for _, text in walked.trajectory],
        "consumed_digest": history_digest(history[:walked.items_consumed]), "source_digest": source,
        "continued": continued,
        "status": "ok" if walked.preference else "failed",
        "error": failures[-1] if failures else None, "failed_steps": len(failures),
        "calls": spent.calls, "prompt_tokens": spent.prompt_tokens, "completion_tokens": spent.completion_tokens,
    }


def failed_user_rows(row: dict[str, Any], error: str) -> list[dict[str, Any]]:
    """The rows a user gets when its program crashed: a failure status, no preference."""
    history = np.asarray(row["history"], dtype=np.int64)
    return [{"user_idx": int(row["user_idx"]), "horizon": horizon, "preference": "", "short_term": [],
             "windows": 0, "items_consumed": 0, "history_start": 0,
             "target_item_idx": int(history[-1] if horizon == "test" else history[-2]),
             "settled_windows": 0, "settled_preference": None, "trajectory_ends": [], "trajectory": [],
             "consumed_digest": None,
             "source_digest": history_digest(history), "continued": False, "status": "error", "error": error,
             "failed_steps": 1, "calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
            for horizon in HORIZONS]


def planned_steps(lengths: np.ndarray, config: ExtractConfig) -> np.ndarray:
    """Windows a fresh user of each length needs (train walk + test continuation), for ordering:
    `count_windows` of the training items, capped at `max_windows`, plus the test window; computed
    for all users at once, since a users job orders millions of rows by it."""
    train = np.asarray(lengths, dtype=np.int64) - 2
    step = stride(config.window, config.overlap)
    windows = np.where(train > 0, 1 + -(-np.maximum(train - config.window, 0) // step), 0)
    if config.max_windows is not None:
        windows = np.minimum(windows, config.max_windows)
    return windows + 1
