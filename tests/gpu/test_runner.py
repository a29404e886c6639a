"""ModelRunner on CPU: KV cache sizing and layout, which rows get sampled, chunked prefill == one-shot prefill."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
import torch
from test_rank import _config  # the rank tests' tiny CPU RunnerConfig (pytest puts tests/gpu on sys.path)

from trillm.protocol.api import SamplingParams
from trillm.protocol.step import PREVIOUS_TOKEN, RankReady, SampleSpec, SeqStep, Shutdown, StepPlan
from trillm.errors import ModelLoadError
from trillm.gpu.rank import recv_message, send_message
from trillm.gpu.kv_cache import plan_num_blocks
from trillm.gpu.runner import ModelRunner

GREEDY = SampleSpec(sampling=SamplingParams(temperature=0.0), output_index=0)


def make_runner(**overrides: Any) -> ModelRunner:
    """A runner on test_rank's tiny config, with room for 4 sequences and 256 prefill tokens."""
    fields: dict[str, Any] = dict(max_batch_size=4, max_prefill_token_num=256, cpu_memory_budget_bytes=4 << 20)
    fields.update(overrides)
    return ModelRunner(_config(**fields))


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return make_runner()


def test_plan_num_blocks_takes_the_budget_capped_by_the_batch() -> None:
    assert (
        plan_num_blocks(bytes_per_block=100, budget_bytes=1000, block_size=4, max_model_len=8, max_batch_size=64) == 10
    )
    assert (
        plan_num_blocks(bytes_per_block=100, budget_bytes=10**6, block_size=4, max_model_len=8, max_batch_size=3) == 6
    )


def test_plan_num_blocks_fails_below_one_sequence() -> None:
    with pytest.raises(ModelLoadError) as info:
        plan_num_blocks(
            bytes_per_block=2**20, budget_bytes=3 * 2**20, block_size=16, max_model_len=64, max_batch_size=8
        )
    assert str(info.value) == (
        "the KV cache budget (3 MiB) holds 3 blocks of 16 tokens, less than one sequence of max_model_len 64 needs "
        "(4 blocks, 4 MiB): lower --session-len or raise the cache budget"
    )


def test_layout_matches_the_allocated_caches(runner: ModelRunner) -> None:
    # tiny: 2 layers, 6 KV heads of 32; a block is 2 (K, V) * 2 layers * 6 * 8 * 32 * 4 bytes = 24 KiB.
    # Budget 0.5 * 4 MiB holds 85 blocks, but 4 sequences of 64 tokens need only 4 * 8 = 32.
    layout = runner.layout
    shape = (layout.num_blocks, layout.block_size, layout.num_layers, layout.num_kv_heads, layout.head_dim)
    assert shape == (32, 8, 2, 6, 32)
    assert layout.dtype == "float32"
    assert len(runner.kv_caches) == 2
    assert all(k.shape == v.shape == (32, 6, 8, 32) for k, v in runner.kv_caches)


def test_budget_decides_when_smaller_than_the_batch_needs() -> None:
    # bfloat16 blocks are 12 KiB; 0.5 × 480 KiB holds 20 of them, fewer than 64 sequences could use.
    small = make_runner(cpu_memory_budget_bytes=480 << 10, max_batch_size=64, dtype="bfloat16")
    assert small.layout.num_blocks == 20 and small.layout.dtype == "bfloat16"
    assert small.kv_caches[0][0].dtype == torch.bfloat16


def test_only_sequences_with_sample_set_are_sampled_in_plan_order(runner: ModelRunner) -> None:
    plan = StepPlan(
        step_id=7,
        seqs=(
            SeqStep(seq_id=30, token_ids=(5, 6, 7), start_pos=0, block_table=(0,), sample=GREEDY),
            SeqStep(seq_id=10, token_ids=(8, 9), start_pos=0, block_table=(1,)),  # a prefill chunk: no sample
            SeqStep(seq_id=20, token_ids=(4,), start_pos=0, block_table=(2,), sample=GREEDY),
        ),
    )
    inputs = runner.prepare(plan)
    assert inputs.sample_rows.tolist() == [2, 5]  # last rows of seq 30 (rows 0-2) and seq 20 (row 5)
    result = runner.step(plan)
    assert result.step_id == 7
    assert [s.seq_id for s in result.sampled] == [30, 20]
    assert all(0 <= s.token_id < runner.vocab_size for s in result.sampled)


def test_prepare_builds_slots_from_block_tables(runner: ModelRunner) -> None:
    plan = StepPlan(step_id=0, seqs=(SeqStep(seq_id=1, token_ids=(1, 2, 3), start_pos=6, block_table=(5, 2)),))
    inputs = runner.prepare(plan)
    assert inputs.positions.tolist() == [6, 7, 8]
    assert inputs.meta.slot_mapping.tolist() == [5 * 8 + 6, 5 * 8 + 7, 2 * 8 + 0]
    assert inputs.meta.context_lens.tolist() == [9] and inputs.meta.cu_seqlens_q.tolist() == [0, 3]
    assert not inputs.meta.is_decode


def test_plan_beyond_its_blocks_is_rejected(runner: ModelRunner) -> None:
    plan = StepPlan(step_id=0, seqs=(SeqStep(seq_id=1, token_ids=tuple(range(9)), start_pos=0, block_table=(0,)),))
    with pytest.raises(ValueError, match="seq 1: context 9 exceeds max_model_len 64 or its 1 blocks"):
        runner.prepare(plan)


def _last_logits(runner: ModelRunner, steps: list[SeqStep]) -> torch.Tensor:
    logits = None
    for i, seq in enumerate(steps):
        logits = runner.forward_logits(runner.prepare(StepPlan(step_id=i, seqs=(seq,))))
    assert logits is not None
    return logits


@pytest.mark.slow
def test_chunked_prefill_gives_the_same_logits_as_one_prefill() -> None:
    runner = make_runner(model_path="random:tiny")
    prompt = tuple(range(3, 23))  # 20 tokens over 3 blocks
    table = (3, 0, 6)
    whole = _last_logits(runner, [SeqStep(seq_id=1, token_ids=prompt, start_pos=0, block_table=table, sample=GREEDY)])
    chunks = [
        SeqStep(seq_id=1, token_ids=prompt[:7], start_pos=0, block_table=table),
        SeqStep(seq_id=1, token_ids=prompt[7:14], start_pos=7, block_table=table),
        SeqStep(seq_id=1, token_ids=prompt[14:], start_pos=14, block_table=table, sample=GREEDY),
    ]
    chunked = _last_logits(runner, chunks)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    # ...and a decode step after it sees the same cache as one more prefill token would.
    decode = _last_logits(runner, [SeqStep(seq_id=1, token_ids=(40,), start_pos=20, block_table=table, sample=GREEDY)])
    longer = _last_logits(
        runner, [SeqStep(seq_id=1, token_ids=prompt + (40,), start_pos=0, block_table=table, sample=GREEDY)]
    )
    torch.testing.assert_close(decode, longer, rtol=1e-5, atol=1e-5)
    assert whole.shape == (1, 512) and whole.dtype == torch.float32


def test_random_preset_folds_token_ids_beyond_its_vocabulary(runner: ModelRunner) -> None:
    plan = StepPlan(step_id=0, seqs=(SeqStep(seq_id=1, token_ids=(49151, 5), start_pos=0, block_table=(0,)),))
    assert runner.prepare(plan).input_ids.tolist() == [49151 % 512, 5]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """random:tiny's weights (drawn on the CPU) saved as an HF folder, so that CPU and CUDA load the same model."""
    from safetensors.torch import save_file

    from trillm.models.llama import LlamaArgs, checkpoint_shapes
    from trillm.models.presets import preset_config, random_weights

    folder = tmp_path_factory.mktemp("tiny")
    config = preset_config("random:tiny")
    (folder / "config.json").write_text(json.dumps(config))
    shapes = checkpoint_shapes(LlamaArgs.from_hf_config(config))
    weights = dict(random_weights(shapes, device=torch.device("cpu"), dtype=torch.float32, seed=1))
    save_file(weights, str(folder / "model.safetensors"))
    return str(folder)


def _prefill_then_decode_logits(runner: ModelRunner) -> torch.Tensor:
    prompt, table = tuple(range(3, 23)), (3, 0, 6)
    steps = [
        SeqStep(seq_id=1, token_ids=prompt[:9], start_pos=0, block_table=table),
        SeqStep(seq_id=1, token_ids=prompt[9:], start_pos=9, block_table=table, sample=GREEDY),
        SeqStep(seq_id=1, token_ids=(40,), start_pos=20, block_table=table, sample=GREEDY),
    ]
    return _last_logits(runner, steps).cpu()


@pytest.mark.gpu
def test_cuda_runner_matches_the_cpu_runner(tiny_folder: str) -> None:
    cpu = _prefill_then_decode_logits(make_runner(model_path=tiny_folder))
    cuda = _prefill_then_decode_logits(make_runner(model_path=tiny_folder, device="cuda"))
    torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-4)
    bf16 = _prefill_then_decode_logits(make_runner(model_path=tiny_folder, device="cuda", dtype="bfloat16"))
    torch.testing.assert_close(bf16, cpu, rtol=0.05, atol=0.05)


@pytest.mark.gpu
def test_cuda_kv_cache_takes_its_share_of_free_memory() -> None:
    free_bytes, _ = torch.cuda.mem_get_info()
    runner = make_runner(device="cuda", max_model_len=1024, max_batch_size=10**6, cache_max_entry_count=0.01)
    block_bytes = 2 * 2 * 6 * 8 * 32 * 4
    assert runner.layout.num_blocks == pytest.approx(0.01 * free_bytes / block_bytes, rel=0.05)
    assert runner.kv_caches[0][0].device.type == "cuda"


# -- step overlap: PREVIOUS_TOKEN --------------------------------------------------------------------------------------

SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=3)


def _overlapped_plans(num_tokens: int) -> list[StepPlan]:
    """A 5-token prefill, then decodes planned ahead: every decode token is PREVIOUS_TOKEN."""
    plans = [StepPlan(step_id=0, seqs=(SeqStep(seq_id=4, token_ids=(9, 8, 7, 6, 5), start_pos=0, block_table=(0, 1),
                                               sample=SampleSpec(sampling=SEEDED, output_index=0)),))]  # fmt: skip
    for step in range(1, num_tokens):
        spec = SampleSpec(sampling=SEEDED, output_index=step)
        seq = SeqStep(seq_id=4, token_ids=(PREVIOUS_TOKEN,), start_pos=4 + step, block_table=(0, 1), sample=spec)
        plans.append(StepPlan(step_id=step, seqs=(seq,)))
    return plans


def _explicit_tokens(runner: ModelRunner, num_tokens: int) -> list[int]:
    tokens: list[int] = []
    for plan in _overlapped_plans(num_tokens):
        seq = plan.seqs[0]
        if seq.token_ids == (PREVIOUS_TOKEN,):
            plan = attrs.evolve(plan, seqs=(attrs.evolve(seq, token_ids=(tokens[-1],)),))
        tokens.append(runner.step(plan).sampled[0].token_id)
    return tokens


def test_previous_token_placeholders_decode_exactly_like_explicit_tokens(runner: ModelRunner) -> None:
    explicit = _explicit_tokens(runner, 6)
    placeholders = [runner.step(plan).sampled[0].token_id for plan in _overlapped_plans(6)]
    assert placeholders == explicit


def test_chained_launches_decode_exactly_like_explicit_tokens(runner: ModelRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each plan launched before the previous one finished: its PREVIOUS_TOKEN comes from the previous draw in place."""
    monkeypatch.setattr("trillm.gpu.runner.CHAINING", True)
    explicit = _explicit_tokens(runner, 6)
    plans = _overlapped_plans(6)
    tokens = []
    pending = runner.launch(plans[0])
    for plan in plans[1:]:
        assert runner.can_chain(plan, pending)
        launched = runner.launch(plan, pending)
        assert launched.inputs.deferred_positions == (0,) and launched.inputs.deferred_rows == (0,)
        tokens.append(runner.finish(pending).sampled[0].token_id)
        pending = launched
    tokens.append(runner.finish(pending).sampled[0].token_id)
    assert tokens == explicit


def test_previous_token_needs_a_sample_in_the_previous_plan(runner: ModelRunner) -> None:
    first, second, _ = _overlapped_plans(3)
    runner.step(first)
    other = SeqStep(seq_id=99, token_ids=(1, 2), start_pos=0, block_table=(2,), sample=GREEDY)
    runner.step(StepPlan(step_id=5, seqs=(other,)))  # seq 4 is absent: its last sample is forgotten (bounded)
    with pytest.raises(ValueError, match="PREVIOUS_TOKEN"):
        runner.step(second)


@pytest.mark.slow
@pytest.mark.parametrize("chaining", ["0", "1"])
def test_tensor_parallel_3_ranks_substitute_placeholders_identically(chaining: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank samples (rank 0 alone reports): placeholders decode as explicit tokens over gloo, seeded draws too,
    and with TRILLM_RANK_CHAINING=1 (the ranks launch each queued plan behind the running one) as well."""
    from test_rank import RankHandle, _free_port

    monkeypatch.setenv("TRILLM_RANK_CHAINING", chaining)  # read by the rank processes started below

    explicit = _explicit_tokens(ModelRunner(_config()), 5)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ranks = [RankHandle(_config(rank=r, world_size=3, dist_init_method=init_method)) for r in range(3)]
    try:
        assert all(isinstance(recv_message(handle.sock, handle.decoder), RankReady) for handle in ranks)
        tokens = []
        plans = _overlapped_plans(5)
        for handle in ranks:  # both plans in each rank's socket before any reply: the overlapped pipeline
            send_message(handle.sock, plans[0])
        for plan in plans[1:]:
            for handle in ranks:
                send_message(handle.sock, plan)
            replies = [recv_message(handle.sock, handle.decoder) for handle in ranks]
            assert [r.sampled for r in replies[1:]] == [(), ()]
            tokens.append(replies[0].sampled[0].token_id)
        replies = [recv_message(handle.sock, handle.decoder) for handle in ranks]
        tokens.append(replies[0].sampled[0].token_id)
        assert tokens == explicit
        for handle in ranks:
            send_message(handle.sock, Shutdown())
    finally:
        for handle in ranks:
            handle.close()
