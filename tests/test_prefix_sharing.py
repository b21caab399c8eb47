"""Prefix-shared training layout: loss and every parameter gradient equal the repeated layout's (tiny Llama, fp32)."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_lm import char_tokenizer, tiny_model

from gem_fast.advantages import sega_token_weights
from gem_fast.flags import parse_config
from gem_fast.distributed import free_port, parallelize
from gem_fast.data import EncodedBatch, PreferencePair, encode_pairs, encode_prompts, join_prompt_and_generation
from gem_fast.logprobs import PairLogprobs
from gem_fast.objectives.pairs import preference_loss
from gem_fast.policy import PolicyLoss
from gem_fast.prefix_sharing import pack_groups, resolve_prefix_sharing

TOL = dict(rtol=1e-4, atol=1e-6)
GRAD_RTOL = 1e-4  # of the tensor's largest entry (the bench's max_rel_grad_diff): summation order differs
CPU = torch.device("cpu")


def _sega_batch(tokenizer, k: int, seed: int) -> tuple[EncodedBatch, torch.Tensor]:
    """3 left-padded prompts of different lengths, k candidates each of 1..7 generated tokens
    (right-padded, junk after each candidate's end), and SEGA token weights A_i / B."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, ["Q: 12+7=", "Q: 3*4 is", "How much is 100-1?"])
    width = 7
    sequences = torch.randint(3, len(tokenizer), (3 * k, width), generator=g)
    lengths = torch.randint(1, width + 1, (3 * k,), generator=g)
    generated = torch.arange(width)[None, :] < lengths[:, None]
    batch = join_prompt_and_generation(prompt_ids, prompt_mask, sequences, generated)
    advantages = torch.randn(3, k, generator=g)
    return batch, sega_token_weights(advantages, 3, batch.input_ids.shape[1] - 1)


def _grads(policy: PolicyLoss) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in policy.named_parameters()}


def _assert_layouts_agree(model, loss_of) -> None:
    """``loss_of(policy)`` under the repeated and the shared layout: equal loss and parameter gradients."""
    results = []
    for shared in (False, True):
        policy = PolicyLoss(copy.deepcopy(model).train(), backend="torch", prefix_sharing=shared)
        loss = loss_of(policy)
        loss.backward()
        results.append((loss.detach(), _grads(policy)))
    (loss_rep, grads_rep), (loss_shared, grads_shared) = results
    torch.testing.assert_close(loss_shared, loss_rep, **TOL)
    assert grads_shared.keys() == grads_rep.keys()
    for name, grad in grads_rep.items():
        scale = grad.abs().max()
        assert scale > 0, name
        assert (grads_shared[name] - grad).abs().max() <= GRAD_RTOL * scale, name


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_sega_step_equals_repeated_layout(attention):
    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer)
    model.set_attn_implementation(attention)
    for k in (1, 2, 5):
        batch, weights = _sega_batch(tokenizer, k, seed=k)
        _assert_layouts_agree(model, lambda policy: policy(batch.input_ids, batch.attention_mask,
                                                           batch.response_mask, weights))


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("objective", ["dpo", "ipo"])
def test_pair_loss_equals_repeated_layout(padding_side, objective):
    tokenizer = char_tokenizer()
    pairs = [PreferencePair("Q: 2+2=", "4 because 2+2 is 4", "5"),
             PreferencePair("What is the capital of France?", "Paris", "Lyon, I think"),
             PreferencePair("Say hi", "hi", "hello there")]
    batch = encode_pairs(tokenizer, pairs, padding_side=padding_side)
    reference = PairLogprobs(torch.tensor([-30.0, -12.0, -5.0]), torch.tensor([-6.0, -20.0, -25.0]),
                             torch.tensor([19, 6, 3]), torch.tensor([2, 14, 12]))

    def loss_of(policy):
        return preference_loss(objective, policy.model, batch, reference, beta=0.1, backend="torch",
                               length_normalize=objective == "ipo", prefix_sharing=policy.prefix_sharing)

    _assert_layouts_agree(tiny_model(tokenizer), loss_of)


def test_packed_layout_computes_each_prompt_once():
    tokenizer = char_tokenizer()
    batch, _ = _sega_batch(tokenizer, 4, seed=0)
    packed = pack_groups(batch)
    prompts = encode_prompts(tokenizer, ["Q: 12+7=", "Q: 3*4 is", "How much is 100-1?"])[1].sum(-1)
    responses = batch.response_mask.sum(-1).view(3, 4).sum(-1)
    assert packed.tokens == int((prompts + responses).sum())  # P + ΣR_i per group, not k(P+R)
    assert packed.targets.numel() == int(batch.response_mask.sum())
    # Each response continues the prompt's positions: its first token sits at position P.
    first = packed.segments[:, 1:] != packed.segments[:, :-1]
    starts = packed.position_ids[:, 1:][first & (packed.segments[:, 1:] > 0)]
    assert starts.tolist() == [int(p) for p in prompts for _ in range(4)]
    # A pair whose prompts were cut differently (max_length) stays two groups.
    pairs = [PreferencePair("a long prompt here", "x", "a much longer answer")]
    assert pack_groups(encode_pairs(tokenizer, pairs, max_length=24)).input_ids.shape[0] == 2
    bad = EncodedBatch(batch.input_ids, batch.attention_mask, batch.response_mask.roll(1, -1))
    with pytest.raises(ValueError, match="row 0"):
        pack_groups(bad)


def test_resolve_prefix_sharing_modes(caplog):
    model = tiny_model(char_tokenizer())
    assert resolve_prefix_sharing("auto", model, "sega", CPU)
    assert not resolve_prefix_sharing("off", model, "dpo", CPU)
    assert not resolve_prefix_sharing("auto", model, "sft", CPU)
    with pytest.raises(ValueError, match="applies to sega"):
        resolve_prefix_sharing("on", model, "sft", CPU)
    model.config._attn_implementation = "flex_attention"  # compiled FlexAttention: CUDA only here
    with caplog.at_level(logging.INFO, logger="gem_fast.prefix_sharing"):
        assert not resolve_prefix_sharing("auto", model, "sega", CPU)
    assert "prefix sharing off (repeated prompts): flex_attention" in caplog.text
    with pytest.raises(ValueError, match="on is not available: flex_attention"):
        resolve_prefix_sharing("on", model, "ipo", CPU)


def test_prefix_sharing_flag_and_yaml_key(tmp_path):
    assert parse_config([], objective="sega", description="").run.prefix_sharing == "auto"
    assert parse_config(["--prefix_sharing", "off"], objective="sega", description="").run.prefix_sharing == "off"
    for spelling in ("on", "'on'"):  # YAML 1.1 reads a bare on as true
        (tmp_path / "dpo.yaml").write_text(f"objective: dpo\nprefix_sharing: {spelling}\n")
        cfg = parse_config(["--config", str(tmp_path / "dpo.yaml")], objective="sft", description="")
        assert cfg.run.prefix_sharing == "on"


def _two_rank_worker(rank: int, world: int, port: int, root: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        results = {}
        for objective, (batch, extra) in _global_batches().items():
            policy = parallelize(PolicyLoss(tiny_model(char_tokenizer()).train(), backend="torch", prefix_sharing=True,
                                            pair_loss=_dpo if objective == "dpo" else None),
                                 activation_checkpointing=True, sharded=True, device=CPU)
            loss = policy(*_rank_rows(batch, extra, objective, rank, world))
            loss.backward()
            dist.all_reduce(loss := loss.detach())
            grads = {n: p.grad.full_tensor() for n, p in policy.named_parameters()}
            results[objective] = (loss / world, {n.replace("_checkpoint_wrapped_module.", ""): g for n, g in grads.items()})
        if rank == 0:
            torch.save(results, root / "rank0.pt")
    finally:
        dist.destroy_process_group()


def _dpo(model, batch, reference, *, backend, prefix_sharing):
    return preference_loss("dpo", model, batch, reference, beta=0.1, backend=backend, prefix_sharing=prefix_sharing)


_PAIRS = [PreferencePair(f"Q{i}: {i}+{i}=", f"{2 * i} as {i}+{i}" * (i % 2 + 1), f"{2 * i + 1}") for i in range(4)]


def _global_batches() -> dict[str, tuple[EncodedBatch, torch.Tensor | PairLogprobs]]:
    """The step's global batch of each objective: SEGA 4 prompts × k=2, weights A_i / 4; DPO 4 pairs."""
    tokenizer = char_tokenizer()
    g = torch.Generator().manual_seed(0)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [p.prompt for p in _PAIRS])
    sequences = torch.randint(3, len(tokenizer), (8, 6), generator=g)
    generated = torch.arange(6)[None, :] < torch.randint(1, 7, (8,), generator=g)[:, None]
    sega = join_prompt_and_generation(prompt_ids, prompt_mask, sequences, generated)
    reference = PairLogprobs(-torch.rand(4, generator=g) * 20, -torch.rand(4, generator=g) * 20,
                             torch.ones(4, dtype=torch.long), torch.ones(4, dtype=torch.long))
    return {"sega": (sega, torch.randn(4, 2, generator=g)), "dpo": (encode_pairs(tokenizer, _PAIRS), reference)}


def _rank_rows(batch: EncodedBatch, extra, objective: str, rank: int, world: int) -> tuple:
    """PolicyLoss inputs of rank ``rank``'s share of the global batch (all of it for world 1)."""
    if objective == "sega":  # prompt-major rows; each rank averages over its own prompts, FSDP over ranks
        prompts = extra.shape[0] // world
        rows = batch.rows(slice(rank * prompts * 2, (rank + 1) * prompts * 2))
        advantages = extra[rank * prompts : (rank + 1) * prompts]
        return (rows.input_ids, rows.attention_mask, rows.response_mask,
                sega_token_weights(advantages, prompts, rows.input_ids.shape[1] - 1))
    n = extra.chosen.shape[0]
    pairs = torch.arange(rank * n // world, (rank + 1) * n // world)
    rows = batch.rows(torch.cat([pairs, pairs + n]))
    return rows.input_ids, rows.attention_mask, rows.response_mask, None, extra.select(pairs)


@pytest.mark.slow
def test_two_rank_fsdp_shared_layout_equals_one_process_repeated(tmp_path):
    mp.spawn(_two_rank_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "rank0.pt")
    for objective, (batch, extra) in _global_batches().items():
        policy = PolicyLoss(tiny_model(char_tokenizer()).train(), backend="torch",
                            pair_loss=_dpo if objective == "dpo" else None)
        loss = policy(*_rank_rows(batch, extra, objective, 0, 1))
        loss.backward()
        got_loss, got_grads = sharded[objective]
        torch.testing.assert_close(got_loss, loss.detach(), **TOL)
        for name, grad in policy.named_parameters():
            want = grad.grad
            assert (got_grads[name] - want).abs().max() <= GRAD_RTOL * want.abs().max(), (objective, name)


def test_bench_quick_writes_the_issue_fields(tmp_path):
    from bench import sega_prefix

    assert sega_prefix.main(["--quick", "--reps", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "sega_prefix.json").read_text())
    for layout in ("repeated", "shared"):
        assert {"step_s", "peak_mb", "tokens"} <= doc[layout].keys() and doc[layout]["step_s"] > 0
    case = sega_prefix.QUICK
    assert doc["repeated"]["tokens"] == case.prompts * case.k * (case.prompt_len + case.response_len)
    assert doc["shared"]["tokens"] == case.prompts * (case.prompt_len + case.k * case.response_len)
    assert doc["max_rel_grad_diff"] <= 1e-4 and doc["loss_diff"] <= 1e-5
