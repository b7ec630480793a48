"""``eagle.offline_eval.simulate_drafts``: the greedy speculative decode that
the offline evaluation replays, checked against a step-by-step decode
written out here (target and drafter as plain token functions)."""

from __future__ import annotations

import random

from eagle.offline_eval import simulate_drafts


def _reference(ids, prompt_len, k, guess):
    """Decode like vLLM's greedy EAGLE loop: the target has produced tokens
    up to ``pos``; the drafter proposes ``k`` tokens after it from the
    newest row; the target accepts the longest correct prefix and adds one
    token of its own."""
    accepted = []
    pos = prompt_len  # the target's first token (from prefill) is ids[prompt_len]
    while pos < len(ids) - 1:
        draft = [guess(pos - 1, i) for i in range(k)]
        n = 0
        while n < k and pos + 1 + n < len(ids) and draft[n] == ids[pos + 1 + n]:
            n += 1
        accepted.append(n)
        pos += n + 1
    return accepted


def test_simulation_matches_a_step_by_step_decode():
    rng = random.Random(0)
    for _ in range(200):
        k = rng.randint(1, 5)
        prompt_len = rng.randint(1, 6)
        ids = [rng.randrange(4) for _ in range(prompt_len + rng.randint(1, 30))]
        preds = [[rng.randrange(4) if rng.random() < 0.4 else
                  (ids[r + 2 + i] if r + 2 + i < len(ids) else 0) for r in range(len(ids))]
                 for i in range(k)]
        got = simulate_drafts(preds, ids, prompt_len, k)
        assert got == _reference(ids, prompt_len, k, lambda row, i: preds[i][row])


def test_a_perfect_drafter_is_capped_at_k():
    ids = list(range(20))
    preds = [[(r + 2 + i) for r in range(20)] for i in range(3)]
    # 20 tokens, prompt of 5: answer tokens 5..19; the prefill gives token 5,
    # each draft then 3 accepted + 1 bonus, the last draft is cut by the end.
    assert simulate_drafts(preds, ids, 5, 3) == [3, 3, 3, 2]
