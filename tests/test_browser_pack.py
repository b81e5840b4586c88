"""Browser tier, graphs built by hand in the frontend as a user would: training-side seeds stay fixed across
queues, and the nodes' status text is shown on the node (web/musubi_status.js).

The frontend gives every INT input named `seed` a "control after generate" widget defaulting to "randomize"
(useIntWidget: `control_after_generate ?? name in (seed, noise_seed)`). A new seed on the second Queue would
discard the training session and restart from step 0."""

import re
import time

import pytest

from comfy_harness import wait_ui_idle

pytestmark = pytest.mark.browser

# (id, type, widget values, {input: (source id, output slot)}): a tiny training graph, as a user would wire it
GRAPH = [
    (1, "MusubiWanDiTLoader", {"model_name": "preset:tiny-t2v", "dtype": "fp32"}, {}),
    (2, "MusubiUMT5Loader", {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32"}, {}),
    (3, "MusubiWanVAELoader", {"vae_name": "preset:tiny-vae", "dtype": "fp32"}, {}),
    (4, "EmptyImage", {"width": 48, "height": 48, "batch_size": 1, "color": 0xCC2222}, {}),
    (5, "MusubiDatasetFromImages", {"captions": "a red square", "width": 48, "height": 48}, {"images": (4, 0)}),
    (6, "MusubiCacheLatents", {}, {"dataset": (5, 0), "vae": (3, 0)}),
    (7, "MusubiCacheTextEmbeddings", {}, {"dataset": (6, 0), "text_encoder": (2, 0)}),
    (8, "MusubiLoRAConfig", {"rank": 4}, {}),
    (9, "MusubiOptimizerConfig", {}, {}),
    (10, "MusubiInitTraining", {"seed": 1234, "max_train_steps": 40, "mixed_precision": "no",
                                "output_name": "browser_seed_lora"},
     {"model": (1, 0), "dataset": (7, 0), "lora_config": (8, 0), "optimizer_config": (9, 0)}),
    (11, "MusubiTrainSteps", {"steps": 2, "train_on_every_queue": True}, {"session": (10, 0)}),
    (12, "PreviewAny", {}, {"source": (11, 3)}),
    (13, "MusubiWanTextEncode", {"prompt": "a red square"}, {"text_encoder": (2, 0)}),
    (14, "MusubiValidate", {"width": 48, "height": 48, "frames": 1, "steps": 2, "seed": 77},
     {"session": (11, 0), "vae": (3, 0), "embeds": (13, 0)}),
    (15, "PreviewImage", {}, {"images": (14, 0)}),
    (16, "MusubiCreateRandomLoRA", {"rank": 2, "seed": 5}, {"model": (1, 0)}),
    (17, "MusubiLoRAInfo", {}, {"lora": (16, 0)}),
]
SEEDED = {10: 1234, 14: 77, 16: 5}

BUILD = """([spec]) => {
    app.graph.clear();
    const made = {};
    for (const [id, type, values] of spec) {
        const node = LiteGraph.createNode(type);
        if (!node) throw new Error('unknown node ' + type);
        app.graph.add(node);
        for (const [name, value] of Object.entries(values)) {
            const w = node.widgets.find(w => w.name === name);
            if (!w) throw new Error(type + ' has no widget ' + name);
            w.value = value;
        }
        made[id] = node;
    }
    for (const [id, type, values, inputs] of spec)
        for (const [name, [src, slot]] of Object.entries(inputs)) {
            const target = made[id], idx = target.findInputSlot(name);
            if (idx < 0 || !made[src].connect(slot, target, idx)) throw new Error('cannot link ' + type + '.' + name);
        }
    app.graph.setDirtyCanvas(true, true);
    return Object.fromEntries(Object.entries(made).map(([k, n]) => [k, n.id]));
}"""


def _queue_and_wait(page, server, timeout=300):
    before = set(server.get_json("/history"))
    page.locator('[data-testid="queue-button"]').first.click()
    deadline = time.time() + timeout
    while time.time() < deadline:
        new = set(server.get_json("/history")) - before
        if new:
            entry = server.get_json(f"/history/{new.pop()}").popitem()[1]
            if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str"):
                return entry
        time.sleep(0.5)
    raise AssertionError("the queued prompt did not finish")


def _step(entry, node_id) -> int:
    text = "".join(entry["outputs"][str(node_id)]["text"])
    found = re.search(r"step (\d+)", text)
    assert found, text
    return int(found.group(1))


def test_hand_built_training_graph_keeps_its_seeds_and_continues_training(comfy_server, browser_page):
    page = browser_page
    wait_ui_idle(page)
    ids = page.evaluate(BUILD, [[list(n[:3]) + [{k: list(v) for k, v in n[3].items()}] for n in GRAPH]])
    for nid in SEEDED:  # no hidden "randomize after generate" widget next to a training-side seed
        names = page.evaluate("(id) => app.graph.getNodeById(id).widgets.map(w => w.name)", ids[str(nid)])
        assert "seed" in names and not any("control" in n for n in names), names

    first = _queue_and_wait(page, comfy_server)
    assert first["status"]["status_str"] == "success", first["status"]
    second = _queue_and_wait(page, comfy_server)
    assert second["status"]["status_str"] == "success", second["status"]

    for nid, seed in SEEDED.items():
        assert page.evaluate("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'seed').value",
                             ids[str(nid)]) == seed
        for entry in (first, second):  # history "prompt" = [number, id, api prompt, extra, outputs]
            assert entry["prompt"][2][str(ids[str(nid)])]["inputs"]["seed"] == seed
    # the same session trained 2 more steps: not a new session restarted from step 0
    assert (_step(first, ids["12"]), _step(second, ids["12"])) == (2, 4)


def test_status_text_is_shown_on_the_node(comfy_server, browser_page):
    """A node's {"ui": {"text": ...}} summary appears on the node (a DOM check, no screenshot)."""
    page = browser_page
    wait_ui_idle(page)
    graph = [(1, "MusubiWanDiTLoader", {"model_name": "preset:tiny-t2v", "dtype": "fp32"}, {}),
             (2, "MusubiUnloadModels", {"mode": "offload", "what": "models"}, {"passthrough": (1, 0)})]
    ids = page.evaluate(BUILD, [[list(n[:3]) + [{k: list(v) for k, v in n[3].items()}] for n in graph]])
    entry = _queue_and_wait(page, comfy_server)
    assert entry["status"]["status_str"] == "success", entry["status"]
    node_id = ids["2"]
    expected = "".join(entry["outputs"][str(node_id)]["text"])
    assert expected.startswith("offload:")
    page.wait_for_function("""([id, text]) => [...document.querySelectorAll('textarea.musubi-status')]
        .some(el => el.dataset.musubiNode === String(id) && el.value === text && el.offsetParent !== null)""",
                           arg=[node_id, expected], timeout=30000)
    # the status widget stays out of the prompt the frontend sends
    api = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert "musubi_status" not in api[str(node_id)]["inputs"]
