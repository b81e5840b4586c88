"""The browser tier: the real ComfyUI frontend in headless Chromium; a workflow file dropped onto the canvas as a
user would, Run clicked, completion awaited, a screenshot kept as an artifact."""

import time

import pytest

from comfy_harness import ARTIFACTS, REPO_ROOT, drop_file, wait_ui_idle

pytestmark = pytest.mark.browser
BENIGN = ("Failed to load resource", "Content Security Policy", "reading 'id'")


@pytest.mark.parametrize("name, sampler_type", [("wan_t2v_generate", "MusubiWanSampler"),
                                                ("hunyuan_t2v_generate", "MusubiHunyuanSampler"),
                                                ("framepack_i2v_generate", "MusubiFramePackSampler"),
                                                ("framepack_one_frame", "MusubiFramePackOneFrameSampler"),
                                                ("wan22_t2v_generate", "MusubiWanSampler")])
def test_drop_t2v_workflow_run_and_screenshot(comfy_server, browser_page, name, sampler_type):
    page = browser_page
    path = REPO_ROOT / "workflows" / f"{name}.json"
    drop_file(page, path)
    page.wait_for_function(f"() => app.graph._nodes.some(n => n.type === '{sampler_type}')", timeout=30000)
    api = page.evaluate("async () => (await app.graphToPrompt()).output")
    sampler = next(v for v in api.values() if v["class_type"] == sampler_type)
    assert sampler["inputs"]["seed"] == 42 and sampler["inputs"]["model"][1] == 0

    wait_ui_idle(page)
    before = set(comfy_server.get_json("/history"))
    page.locator('[data-testid="queue-button"]').first.click()
    deadline, entry = time.time() + 300, None
    while time.time() < deadline and not entry:
        new = set(comfy_server.get_json("/history")) - before
        entry = comfy_server.get_json(f"/history/{new.pop()}").popitem()[1] if new else None
        time.sleep(0.5)
    assert entry and entry["status"]["status_str"] == "success", entry
    # the canvas loads a node's images when it draws it: bring the preview into view (larger graphs put it low)
    page.evaluate("""() => { const n = app.graph._nodes.find(n => n.type === 'PreviewImage');
                             app.canvas.centerOnNode?.(n); app.canvas.setDirty(true, true); }""")
    page.wait_for_function("() => (app.graph._nodes.find(n => n.type === 'PreviewImage')?.imgs?.length ?? 0) > 0",
                           timeout=60000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = "browser_t2v_after_run.png" if name.startswith("wan") else f"browser_{name}_after_run.png"
    page.screenshot(path=str(ARTIFACTS / shot))
    unexpected = [e for e in page.console_errors if not any(b in e for b in BENIGN)]
    assert not unexpected, unexpected
