"""Two-expert training places each expert with its own run options (`TimestepExperts.options`: its loader's block
swap), as the sampler's `ExpertRunner` does: the placement calls carry each expert's settings, a swapped expert
trains bit-identically to the unswapped run (the engine's fake transfer on CPU), and the pair's validation sampler
gets both experts with their options but the training's attention kernel."""

import torch

from engine.handle import RunOptions
from engine.memory import FakeTransfer
from engine.memory.residency import Residency
from engine.training.experts import HIGH, LOW
from test_engine_wan22_training import experts, files, session, train  # noqa: F401  (files: the presets fixture)


def test_each_expert_is_placed_with_its_own_options(files, tmp_path, monkeypatch):
    m = experts(files)
    names = {id(m[HIGH]): HIGH, id(m[LOW]): LOW}
    res, log = Residency(), []
    monkeypatch.setattr(res, "place", lambda module, device, blocks_to_swap=0, offload_non_blocks=False,
                        training=False: log.append((names[id(module)], blocks_to_swap, offload_non_blocks, training)))
    monkeypatch.setattr(res, "park", lambda module, pin_memory=True: log.append((names[id(module)], "park")))
    options = {HIGH: RunOptions(blocks_to_swap=1, offload_non_blocks=True, attention="sage"),
               LOW: RunOptions(blocks_to_swap=0)}
    s = session(files, tmp_path, steps=8, mode="offload", device="cpu", residency=res, models=m, options=options)
    _, picked = train(s, 8)
    placed = [x for x in log if x[1] != "park"]
    assert {x[0] for x in placed} == {HIGH, LOW}
    assert all(x[1:] == ((1, True, True) if x[0] == HIGH else (0, False, True)) for x in placed), placed
    target = s.pair.sampling_target(s.family)
    assert (target.high.options.blocks_to_swap, target.low.options.blocks_to_swap) == (1, 0)
    assert target.high.options.attention is None      # the training's kernel, not a loader's (sage: no backward)
    assert target.high.module is m[HIGH] and target.device == torch.device("cpu") and target.residency is res


def test_a_swapped_expert_trains_as_the_unswapped_run(files, tmp_path):
    plain, _ = train(session(files, tmp_path / "plain", steps=6, mode="offload", device="cpu"), 6)
    res = Residency()
    res.use_test_transfer(FakeTransfer)
    s = session(files, tmp_path / "swap", steps=6, mode="offload", device="cpu", residency=res,
                options={HIGH: RunOptions(blocks_to_swap=1), LOW: RunOptions()})
    swapped, picked = train(s, 6)
    assert HIGH in picked and swapped == plain
    assert res.active_swapper(s.pair.models[HIGH]) is not None and res.active_swapper(s.pair.models[LOW]) is None
    res.release()
