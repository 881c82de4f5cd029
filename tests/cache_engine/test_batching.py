"""Merged forwards: requests running at once share their leaf forwards, each under its own policy.

Each request runs its own pipeline (sharing the transformer) in its own thread, session and batch
member. The members are admitted before any thread starts and the batcher waits for admitted members,
so the requests start denoising together and merge from their first block on: which calls merge is
decided by the requests' policies alone, not by the threads' timing.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

import cache_engine as ce
from cache_engine.batching import BatchStats, ForwardBatcher
from tests.cache_engine.pipelines import TinyPipeline, clone_with_shared_transformer
from tests.cache_engine.support import LOCKSTEP_TIMEOUT, STEPS, our_config, run_with, tiny

# Long enough for every admitted thread to reach its first block on a loaded machine.
WAIT_FOR_ADMITTED_S = 60.0

Job = tuple[TinyPipeline, object | None, int]


def _every_method(tp: TinyPipeline) -> list[object | None]:
    """A policy of each of the engine's methods that reuses on ``tp``, beside no policy."""
    return [
        None,
        our_config("first_block_cache", tp),
        our_config("taylorseer", tp),
        our_config("pyramid_attention_broadcast", tp),
        our_config("faster_cache", tp),
        ce.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.5, max_warmup_steps=1
        ),
        ce.SeaCacheConfig(threshold=0.6, retention_steps=1),
        ce.TeaCacheConfig(rel_l1_thresh=0.5, coefficients=(1.0, 0.0), num_steps=STEPS),
        ce.MagCacheConfig(
            threshold=0.5, mag_ratios=tuple(FLUX_MAG_RATIOS.tolist()), num_inference_steps=STEPS
        ),
        ce.GuardedTaylorSeerCacheConfig(step_tolerance=10.0, disable_cache_before_step=2, max_order=0),
    ]


def _alone(engine: ce.CacheEngine, job: Job) -> tuple[torch.Tensor, ce.SessionStats]:
    tp, config, seed = job
    with engine.session(config) as session:
        output = run_with(tp, seed=seed)
    return output, session.stats


def _merged(
    engine: ce.CacheEngine,
    jobs: Sequence[Job],
    *,
    fail: int | None = None,
    callbacks: dict[int, Any] | None = None,
    stall_s: float = 0.5,
) -> list[tuple[torch.Tensor | BaseException, ce.SessionStats | None, BatchStats]]:
    """Every job in its own thread and session, all admitted to one batcher before any starts."""
    sizes: list[int] = []
    batcher = ForwardBatcher(wait_s=WAIT_FOR_ADMITTED_S, stall_s=stall_s, on_run=sizes.append)
    members = [batcher.admit() for _ in jobs]
    results: dict[int, Any] = {}

    def run(index: int) -> None:
        tp, config, seed = jobs[index]
        extra: dict[str, Any] = {}
        if index == fail:
            extra["callback_on_step_end"] = _raise_at_step(2)
        if callbacks and index in callbacks:
            extra["callback_on_step_end"] = callbacks[index]
        stats = None
        try:
            with members[index].bound(), engine.session(config) as session:
                output: torch.Tensor | BaseException = run_with(tp, seed=seed, **extra)
                stats = session.stats
        except RuntimeError as error:
            output = error
        results[index] = (output, stats, members[index].stats)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOCKSTEP_TIMEOUT)
    assert batcher.members == 0
    assert max(sizes) > 1
    return [results[index] for index in range(len(jobs))]


def _raise_at_step(step: int) -> Any:
    def callback(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if index == step:
            raise RuntimeError("this member fails")
        return {}

    return callback


def _jobs(tp: TinyPipeline, policies: list[object | None]) -> list[Job]:
    pipes = [tp] + [clone_with_shared_transformer(tp) for _ in policies[1:]]
    return [
        (pipe, config, index % 3) for index, (pipe, config) in enumerate(zip(pipes, policies, strict=True))
    ]


def _alone_then_merged(
    tp: TinyPipeline, policies: list[object | None], **options: Any
) -> tuple[
    list[tuple[torch.Tensor, ce.SessionStats]],
    list[tuple[torch.Tensor | BaseException, ce.SessionStats | None, BatchStats]],
]:
    """One job per policy on ``tp``, each run alone, then all merged (``options`` go to ``_merged``), on
    one engine over its transformer."""
    engine = ce.CacheEngine(tp.pipe.transformer)
    try:
        jobs = _jobs(tp, policies)
        alone = [_alone(engine, job) for job in jobs]
        return alone, _merged(engine, jobs, **options)
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("family", "cfg"),
    [("flux", "separate"), ("wan", "separate"), ("wan22_5b", "separate"), ("sd3", "batched")],
)
def test_every_method_in_merged_forwards_gives_what_it_gives_alone(family: str, cfg: str) -> None:
    """Ten policies, one of each method and none, in one merged run."""
    tp = tiny(family, cfg)
    engine = ce.CacheEngine(tp.pipe.transformer)
    try:
        policies = _every_method(tp)
        for config in policies:
            engine.check(config)
        methods = {ce.method_name(config) for config in policies if config is not None}
        assert None in policies and methods == set(ce.METHOD_NAMES) - {"none"}
        jobs = _jobs(tp, policies)
        alone = [_alone(engine, job) for job in jobs]
        together = _merged(engine, jobs)
    finally:
        engine.close()

    for (output, stats), (merged_output, merged_stats, batch) in zip(alone, together, strict=True):
        assert isinstance(merged_output, torch.Tensor) and merged_stats is not None
        torch.testing.assert_close(merged_output, output, rtol=1e-4, atol=1e-5)
        # The same cache decisions: every count as alone. A merged call's outputs are each member's own
        # rows, copied compact, so a state that alone held views of a wider storage holds less; a
        # guarded method's estimate is computed from the latents.
        assert (
            dataclasses.replace(
                merged_stats, peak_bytes=stats.peak_bytes, estimated_error=stats.estimated_error
            )
            == stats
        )
        assert (
            0 < merged_stats.peak_bytes <= stats.peak_bytes
            or merged_stats.peak_bytes == stats.peak_bytes == 0
        )
        if stats.estimated_error is None:
            assert merged_stats.estimated_error is None
        else:
            assert merged_stats.estimated_error == pytest.approx(stats.estimated_error, rel=1e-4)
        assert batch.runs > 0 and batch.largest > 1
    # A real mix: every policy reused, and they decided differently.
    assert all(stats.steps_cached > 0 for _, stats in alone[1:])
    assert len({stats.blocks_computed for _, stats in alone}) > 2


@pytest.mark.parametrize("method", ["pyramid_attention_broadcast", "taylorseer", "faster_cache"])
def test_a_policy_acting_on_attention_merges_whole_blocks(method: str) -> None:
    """A request whose policy acts on attention shares whole blocks with one without a policy: inside
    them, its policy decides for its own rows at each attention (reusing on some steps), and both get
    what they get alone."""
    tp = tiny("flux", "separate")
    alone, together = _alone_then_merged(tp, [None, our_config(method, tp)])
    for (output, stats), (merged_output, merged_stats, batch) in zip(alone, together, strict=True):
        assert isinstance(merged_output, torch.Tensor) and merged_stats is not None
        torch.testing.assert_close(merged_output, output, rtol=1e-4, atol=1e-5)
        assert merged_stats.attention_reused == stats.attention_reused
        assert batch.runs == merged_stats.blocks_computed and batch.largest == 2
    # The policy's leaves are the blocks, each shared with the other request (which runs more of them
    # where FasterCache skips a whole pass).
    policy_batch = together[1][2]
    assert policy_batch.merged == policy_batch.runs
    assert alone[1][1].attention_reused > 0


def test_a_member_held_up_between_steps_holds_nobody_up() -> None:
    """A request whose step callback waits for the others to finish (a slow callback, at its worst) is
    waited for at most stall_s: the others go on without it, and finish."""
    tp = tiny("flux", "separate")
    others_done = threading.Event()
    finished: list[int] = []

    def held(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if index == 1:
            assert others_done.wait(LOCKSTEP_TIMEOUT), "the others never finished"
        return {}

    def counted(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if index == STEPS - 1:
            finished.append(index)
            if len(finished) == 2:
                others_done.set()
        return {}

    alone, together = _alone_then_merged(
        tp,
        [None, our_config("first_block_cache", tp), None],
        callbacks={0: held, 1: counted, 2: counted},
        stall_s=0.05,
    )
    for (output, _), (merged_output, _, _) in zip(alone, together, strict=True):
        assert isinstance(merged_output, torch.Tensor)
        torch.testing.assert_close(merged_output, output, rtol=1e-4, atol=1e-5)


def test_a_request_alone_runs_its_leaves_in_place_once_each() -> None:
    """Alone, a request's leaves run where it stands; the modules inside a leaf (its attention) are part
    of it, not leaves of their own."""
    tp = tiny("flux", "separate")
    engine = ce.CacheEngine(tp.pipe.transformer)
    sizes: list[int] = []
    batcher = ForwardBatcher(on_run=sizes.append)
    member = batcher.admit()
    try:
        with member.bound(), engine.session(None) as session:
            run_with(tp, seed=0)
    finally:
        engine.close()
    assert session.stats.blocks_computed > 0
    assert member.stats.runs == session.stats.blocks_computed == len(sizes)
    assert member.stats.largest == 1 and set(sizes) == {1}


def test_a_member_past_its_last_step_is_not_waited_for() -> None:
    """A request decoding after its last denoiser call is not one about to start: the others' calls run
    without waiting ``wait_s`` for it (which would hold them up for the whole of its decoding)."""
    leaf = torch.nn.Linear(4, 4)
    batcher = ForwardBatcher(wait_s=WAIT_FOR_ADMITTED_S, stall_s=WAIT_FOR_ADMITTED_S)
    decoding, decoded = threading.Event(), threading.Event()
    finishing, running = batcher.admit(), batcher.admit()

    def decode() -> None:
        with finishing.bound():
            finishing.enter_loop()
            finishing.leave_loop()
            decoding.set()
            decoded.wait(LOCKSTEP_TIMEOUT)

    outputs: list[torch.Tensor] = []

    def forward() -> None:
        with running.bound():
            outputs.append(batcher.run(running, leaf, 0, leaf.forward, (torch.ones(1, 4),), {}))

    decoder = threading.Thread(target=decode)
    decoder.start()
    try:
        assert decoding.wait(LOCKSTEP_TIMEOUT)
        runner = threading.Thread(target=forward)
        runner.start()
        # Waited for, the call would sleep the whole WAIT_FOR_ADMITTED_S.
        runner.join(WAIT_FOR_ADMITTED_S / 2)
        assert not runner.is_alive(), "the call waited for a request past its last step"
    finally:
        decoded.set()
        decoder.join(LOCKSTEP_TIMEOUT)
    with torch.no_grad():
        assert torch.equal(outputs[0], leaf(torch.ones(1, 4)))
    assert running.stats.largest == 1


def test_a_member_that_fails_fails_alone() -> None:
    tp = tiny("flux", "separate")
    alone, together = _alone_then_merged(tp, [None, our_config("first_block_cache", tp), None], fail=1)
    assert isinstance(together[1][0], RuntimeError)
    for index in (0, 2):
        merged_output = together[index][0]
        assert isinstance(merged_output, torch.Tensor)
        torch.testing.assert_close(merged_output, alone[index][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["pyramid_attention_broadcast", "taylorseer", "faster_cache"])
def test_a_merged_block_that_fails_after_a_policy_decided_inside_runs_again_apart(method: str) -> None:
    """The merged forward of each block fails after its attention, where the policy already decided for
    its request's rows (and moved its state on): each request runs the block again apart, its policy's
    decisions there taken as made, not made twice, so both get what they get alone, counts included.
    The failure is a fake (a feed-forward refusing more rows than one request's), standing for an
    out-of-memory on the merged rows, which a CPU cannot be made to raise."""
    tp = tiny("flux", "separate")

    def refuse_merged_rows(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if args[0].shape[0] > 1:
            raise torch.OutOfMemoryError("the merged rows do not fit")

    failing = [
        block.ff.register_forward_pre_hook(refuse_merged_rows)
        for block in tp.pipe.transformer.transformer_blocks
    ]
    try:
        alone, together = _alone_then_merged(tp, [None, our_config(method, tp)])
    finally:
        for handle in failing:
            handle.remove()
    for (output, stats), (merged_output, merged_stats, _) in zip(alone, together, strict=True):
        assert isinstance(merged_output, torch.Tensor) and merged_stats is not None
        torch.testing.assert_close(merged_output, output, rtol=1e-4, atol=1e-5)
        assert dataclasses.replace(merged_stats, peak_bytes=stats.peak_bytes) == stats
    assert alone[1][1].attention_reused > 0


def test_a_block_calling_a_module_on_another_batch_merges_whole_only_where_nothing_acts_inside() -> None:
    """Some blocks fold frames into the batch before attention: there a request's rows cannot be told
    apart. Stood for by hooks that hand each single block's attention its rows twice and keep one copy of
    the output (the same arithmetic per row). The first merged forward of such a block runs again apart;
    from then on a policy acting on its attention merges at the attention, and every answer is as alone."""
    from cache_engine.session import _ROWS_NOT_KEPT

    tp = tiny("flux", "separate")
    blocks = list(tp.pipe.transformer.single_transformer_blocks)

    def doubled(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": torch.cat([hidden, hidden])}

    def halved(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        return output[: output.shape[0] // 2]

    hooks = [block.attn.register_forward_pre_hook(doubled, with_kwargs=True) for block in blocks]
    hooks += [block.attn.register_forward_hook(halved, with_kwargs=True) for block in blocks]
    try:
        alone, together = _alone_then_merged(tp, [None, our_config("pyramid_attention_broadcast", tp)])
    finally:
        for hook in hooks:
            hook.remove()
    assert all(block in _ROWS_NOT_KEPT for block in blocks)
    for (output, stats), (merged_output, merged_stats, batch) in zip(alone, together, strict=True):
        assert isinstance(merged_output, torch.Tensor) and merged_stats is not None
        torch.testing.assert_close(merged_output, output, rtol=1e-4, atol=1e-5)
        assert dataclasses.replace(merged_stats, peak_bytes=stats.peak_bytes) == stats
        assert batch.merged > 0
    assert alone[1][1].attention_reused > 0


class _FailsOnMergedRows(torch.nn.Module):
    """A leaf that cannot run more rows than one request's: a fake, since the failure it stands for (a
    merged forward running out of device memory) cannot be provoked on a CPU."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[0] > 1:
            raise torch.OutOfMemoryError("the merged rows do not fit")
        if float(hidden_states.sum()) < 0:
            raise ValueError("this request's own rows fail")
        return hidden_states * 2


def test_a_merged_call_that_raises_runs_again_apart() -> None:
    """Each request then gets what it gets alone: its output, or its own error."""
    leaf = _FailsOnMergedRows()
    sizes: list[int] = []
    batcher = ForwardBatcher(wait_s=WAIT_FOR_ADMITTED_S, on_run=sizes.append)
    inputs = [torch.full((1, 4), 1.0), torch.full((1, 4), -1.0), torch.full((1, 4), 3.0)]
    members = [batcher.admit() for _ in inputs]
    outcomes: dict[int, torch.Tensor | BaseException] = {}

    def run(index: int) -> None:
        with members[index].bound() as member:
            try:
                outcomes[index] = batcher.run(member, leaf, 0, leaf.forward, (inputs[index],), {})
            except (ValueError, torch.OutOfMemoryError) as error:
                outcomes[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOCKSTEP_TIMEOUT)
    # The three were merged, and that call raised: each then ran alone.
    assert sizes == [3]
    first, second, third = outcomes[0], outcomes[1], outcomes[2]
    assert isinstance(first, torch.Tensor) and torch.equal(first, inputs[0] * 2)
    assert isinstance(second, ValueError)
    assert isinstance(third, torch.Tensor) and torch.equal(third, inputs[2] * 2)
    assert all(member.stats.largest == 3 for member in members)
