"""A real ComfyUI for the tests, in three tiers (pytest plugin, loaded by conftest.py).

* in-process (`comfy` fixture): API-format prompts through ComfyUI's real `PromptExecutor`, the pack loaded exactly as
  ComfyUI loads it (`nodes.load_custom_node`), a progress hook installed as main.py installs it (so progress ticks
  are cancel points). `emulate_038()` switches on the two 0.38 behaviours the pack must survive: a throttled
  progress hook and an interrupt exception deriving from BaseException.
* server (`comfy_server` fixture): `main.py --cpu` on a free 127.0.0.1 port, the pack symlinked into
  `custom_nodes`, in-memory database; HTTP + websocket client.
* browser (`browser_page` fixture): Debian chromium driven by pip playwright against the server's real frontend.

ComfyUI comes from `COMFYUI_DIR` (default: the tree scripts/setup_env.sh extracted). The executor and the server
object are built only through `make_executor` / `make_server`, which absorb the constructor changes of newer
ComfyUI (`cache_args["ram_inactive"]`, `PromptServer(loop, asset_manager)`), and prompt ids are UUIDs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Where scripts/setup_env.sh puts ComfyUI: $COMFYUI_DIR if given, else $MUSUBI_ENV/ComfyUI (~/.cache/comfyui-musubi).
COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR") or Path(os.environ.get("MUSUBI_ENV") or Path.home() / ".cache/comfyui-musubi")
                   .expanduser() / "ComfyUI").resolve()
PACK_ALIAS = "musubi_pack"  # importable name of the pack as ComfyUI loaded it
ARTIFACTS = Path(os.environ.get("MUSUBI_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
CACHE_ARGS = {"lru": 0, "ram": 0, "ram_inactive": 0}  # 0.38 reads ram_inactive too; 0.3.75 ignores it


def _require_comfy_dir() -> None:
    if not (COMFYUI_DIR / "main.py").is_file():
        raise pytest.UsageError(f"COMFYUI_DIR={COMFYUI_DIR} has no main.py; run scripts/setup_env.sh first")


# --------------------------------------------------------------------------------------------------------------
# in-process boot
# --------------------------------------------------------------------------------------------------------------
class _Booted:
    """ComfyUI's modules, imported once per test session in the order main.py uses."""

    def __init__(self, output_dir: Path | None = None):
        _require_comfy_dir()
        sys.path.insert(0, str(COMFYUI_DIR))
        from comfy.cli_args import args  # parses [] unless enable_args_parsing() was called: pytest argv is ignored

        args.cpu = True
        args.disable_metadata = False
        self.work = Path(tempfile.mkdtemp(prefix="musubi_comfy_"))
        args.base_directory = str(self.work)
        import utils.extra_config  # noqa: F401  (before `nodes`, which shadows `utils` with comfy/utils.py)
        import folder_paths

        for sub in ("output", "input", "temp", "models", "user"):
            (self.work / sub).mkdir(exist_ok=True)
        folder_paths.set_output_directory(str(output_dir or self.work / "output"))
        folder_paths.set_input_directory(str(self.work / "input"))
        folder_paths.set_temp_directory(str(self.work / "temp"))
        import comfy.model_management
        import comfy.utils
        import execution
        import nodes

        self.folder_paths = folder_paths
        self.mm = comfy.model_management
        self.comfy_utils = comfy.utils
        self.execution = execution
        self.nodes = nodes
        # core nodes from comfy_extras (CreateVideo, SaveVideo, ...) the workflows may use
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        self.pack = load_pack(REPO_ROOT)
        self.pack_name = module_name_for(REPO_ROOT)
        for name, mod in list(sys.modules.items()):  # `import musubi_pack.nodes...` gives the SAME modules
            if name == self.pack_name or name.startswith(self.pack_name + "."):
                sys.modules[PACK_ALIAS + name[len(self.pack_name):]] = mod


def module_name_for(pack_dir: Path) -> str:
    return str(pack_dir).replace(".", "_x_")  # how nodes.load_custom_node names a pack module


def load_pack(pack_dir: Path):
    """Load a pack the way ComfyUI does; raise if ComfyUI reports IMPORT FAILED for it."""
    import nodes

    ok = asyncio.run(nodes.load_custom_node(str(pack_dir), module_parent="custom_nodes"))
    if not ok:
        raise RuntimeError(f"IMPORT FAILED: ComfyUI could not load {pack_dir} as a custom node pack (see log)")
    return sys.modules[module_name_for(pack_dir)]


_BOOT: _Booted | None = None


def boot(output_dir: Path | None = None) -> _Booted:
    global _BOOT
    if _BOOT is None:
        _BOOT = _Booted(output_dir)
    return _BOOT


def make_executor(server):
    """`PromptExecutor` across versions: full cache_args, `asset_manager` only where the signature has it."""
    execution = boot().execution
    kwargs = {"cache_type": execution.CacheType.CLASSIC, "cache_args": dict(CACHE_ARGS)}
    if "asset_manager" in inspect.signature(execution.PromptExecutor).parameters:
        kwargs["asset_manager"] = None
    return execution.PromptExecutor(server, **kwargs)


def make_server(loop):
    """A real `server.PromptServer` object (never started), for code that needs `PromptServer.instance`."""
    import server

    params = inspect.signature(server.PromptServer).parameters
    return server.PromptServer(loop, None) if "asset_manager" in params else server.PromptServer(loop)


class RecordingServer:
    """Stands in for PromptServer: what PromptExecutor and the progress hook call. Records every event."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.events: list[tuple[str, dict]] = []
        self.texts: list[tuple[str, str]] = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        self.texts.append((str(node_id), text if isinstance(text, str) else text.decode()))

    def queue_updated(self):
        pass


class BaseInterrupt(BaseException):
    """0.38's InterruptProcessingException derives from BaseException (PR #13523)."""


class InProcessComfy:
    def __init__(self):
        self.b = boot()
        self.server = RecordingServer()
        self.executor = make_executor(self.server)
        self.throttle = False
        self.cancel_after: tuple[str | None, int] | None = None
        self.progress_calls: list[tuple[str, int, int]] = []
        self.previews: list[tuple[str, tuple]] = []   # (node id, (format, PIL image, max size)) as the hook got them
        self.b.comfy_utils.set_progress_bar_global_hook(self._progress_hook)
        self._install_prompt_server()

    def _install_prompt_server(self):
        """Let the pack's `PromptServer.instance.send_progress_text` reach the recorder."""
        import server as server_module

        if getattr(server_module.PromptServer, "instance", None) is None:
            server_module.PromptServer.instance = self.server

    # main.py's hijack_progress, with an optional 0.38-style throttle in front of it.
    def _progress_hook(self, value, total, preview_image, prompt_id=None, node_id=None):
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context

        ctx = get_executing_context()
        if ctx is not None:
            prompt_id = prompt_id or ctx.prompt_id
            node_id = node_id or ctx.node_id
        self.progress_calls.append((str(node_id), int(value), int(total)))
        if preview_image is not None:
            self.previews.append((str(node_id), preview_image))
        if self.cancel_after is not None:
            target, n = self.cancel_after
            if (target is None or str(node_id) == target) and \
                    sum(1 for c in self.progress_calls if target is None or c[0] == target) >= n:
                self.b.mm.interrupt_current_processing(True)
        if self.throttle and not (value <= 1 or value >= total):
            # 0.38 drops updates closer than 100 ms / 0.5 % (previews pass). We drop every update but the first and
            # the last: the worst case, so the pack's own per-step cancel check is what must stop the loop.
            return
        self.b.mm.throw_exception_if_processing_interrupted()
        get_progress_state().update_progress(node_id, value, total, preview_image)
        self.server.send_sync("progress", {"value": value, "max": total, "node": node_id, "prompt_id": prompt_id})

    @contextlib.contextmanager
    def emulate_038(self):
        """Throttled progress + BaseException interrupt, as ComfyUI 0.38 behaves."""
        mm = self.b.mm
        old_exc, old_throttle = mm.InterruptProcessingException, self.throttle
        mm.InterruptProcessingException = BaseInterrupt
        self.throttle = True
        try:
            yield
        finally:
            mm.InterruptProcessingException = old_exc
            self.throttle = old_throttle

    # ------------------------------------------------------------------------------------------------------
    def validate(self, prompt: dict):
        return asyncio.run(self.b.execution.validate_prompt(str(uuid.uuid4()), prompt, None))

    def run(self, prompt: dict, expect_success: bool = True, extra_pnginfo: dict | None = None):
        """Validate and execute an API-format prompt. Returns the executor's history result.

        The prompt is deep-copied first: ComfyUI writes `is_changed` values into the dict it executes, and the
        frontend always sends a fresh one."""
        import copy

        prompt = copy.deepcopy(prompt)
        ok, err, outputs, node_errors = self.validate(prompt)
        # ComfyUI runs the outputs that validate and drops the others: a test expecting success wants them all
        if not ok or (expect_success and node_errors):
            raise AssertionError(f"invalid prompt: {err} {json.dumps(node_errors)[:3000]}")
        self.server.events.clear()
        self.server.texts.clear()
        self.progress_calls.clear()
        self.previews.clear()
        self.b.mm.interrupt_current_processing(False)
        extra = {"client_id": "pytest"}
        if extra_pnginfo is not None:
            extra["extra_pnginfo"] = extra_pnginfo
        self.executor.execute(prompt, str(uuid.uuid4()), extra_data=extra, execute_outputs=outputs)
        if expect_success and not self.executor.success:
            errs = [d for e, d in self.server.events if e in ("execution_error", "execution_interrupted")]
            raise AssertionError(f"execution failed: {json.dumps(errs, default=str)[:6000]}")
        return self.executor.history_result

    def run_workflow(self, workflow: dict, **kw):
        """Convert a UI-format workflow (as the frontend would) and run it, embedding the workflow as the UI does."""
        return self.run(ui_to_api(workflow, self.input_types()), extra_pnginfo={"workflow": workflow}, **kw)

    def events_of(self, kind: str) -> list[dict]:
        return [d for e, d in self.server.events if e == kind]

    def error_message(self) -> str:
        errs = self.events_of("execution_error")
        return errs[-1].get("exception_message", "") if errs else ""

    def output(self, node_id: str, index: int = 0):
        """The value a node returned (first list element), straight from the executor's cache."""
        cache = self.executor.caches.outputs
        entry = cache.get(str(node_id))
        if inspect.iscoroutine(entry):  # newer ComfyUI: async caches
            entry = asyncio.run(entry)
        return entry.outputs[index][0]

    def module(self, node_id: str, index: int = 0):
        """The model inside a model socket's value (a ModelHandle: module + family + run options)."""
        return self.output(node_id, index).module

    def input_types(self) -> dict:
        return {name: cls.INPUT_TYPES() for name, cls in self.b.nodes.NODE_CLASS_MAPPINGS.items()}

    def pack_module(self, sub: str = ""):
        """A module of the loaded pack, the same object the pack uses (imported under the pack's own name now if the
        pack has not imported it yet, and aliased: importing it under the alias would make a second copy)."""
        alias = PACK_ALIAS + (("." + sub) if sub else "")
        if alias not in sys.modules:
            sys.modules[alias] = importlib.import_module(self.b.pack_name + "." + sub)
        return sys.modules[alias]


# --------------------------------------------------------------------------------------------------------------
# UI-format -> API-format (what the frontend's graphToPrompt does, for the subset our workflows use)
# --------------------------------------------------------------------------------------------------------------
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _widget_inputs(spec: dict) -> list[tuple[str, tuple]]:
    out = []
    for section in ("required", "optional"):
        for name, s in spec.get(section, {}).items():
            typ, opts = s[0], (s[1] if len(s) > 1 else {})
            is_widget = isinstance(typ, list) or typ in WIDGET_TYPES
            if is_widget and not opts.get("forceInput"):
                out.append((name, (typ, opts)))
    return out


def _has_control_widget(name: str, typ, opts: dict) -> bool:
    # the frontend's rule (useIntWidget): `control_after_generate ?? name in (seed, noise_seed)`; an explicit False
    # means no control widget, hence no extra widgets_values entry
    return typ == "INT" and bool(opts.get("control_after_generate", name in ("seed", "noise_seed")))


def ui_to_api(workflow: dict, input_types: dict) -> dict:
    links = {l[0]: l for l in workflow["links"]}
    by_id = {n["id"]: n for n in workflow["nodes"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0 or node["type"] in ("Note", "MarkdownNote", "Reroute"):
            continue
        if node["type"] not in input_types:
            raise AssertionError(f"workflow node {node['id']} has unknown type {node['type']!r}")
        spec = input_types[node["type"]]
        inputs = {}
        linked = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                src = links[inp["link"]]
                src_node = by_id[src[1]]
                if src_node["type"] == "Reroute":  # follow reroutes back to the producer
                    while src_node["type"] == "Reroute":
                        src = links[src_node["inputs"][0]["link"]]
                        src_node = by_id[src[1]]
                linked[inp["name"]] = [str(src[1]), src[2]]
        values = list(node.get("widgets_values", []))
        for name, (typ, opts) in _widget_inputs(spec):
            if not values:
                break
            value = values.pop(0)
            if _has_control_widget(name, typ, opts) and values:
                values.pop(0)  # control_after_generate is frontend-only
            if name not in linked:
                inputs[name] = value
        inputs.update(linked)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# --------------------------------------------------------------------------------------------------------------
# server tier
# --------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """`main.py --cpu` on a free port with the given packs symlinked into a throw-away base directory.

    `kill()` ends it with SIGKILL (a crash or power cut as ComfyUI sees it) and `start()` again runs a new server
    process on the same base directory (models, inputs, outputs and user settings survive, as on a real restart)."""

    def __init__(self, pack_dirs: list[Path], extra_args: tuple = ()):
        _require_comfy_dir()
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="musubi_server_"))
        (self.base / "custom_nodes").mkdir()
        for d in pack_dirs:
            os.symlink(Path(d).resolve(), self.base / "custom_nodes" / Path(d).resolve().name)
        for sub in ("models", "input", "output", "temp", "user"):
            (self.base / sub).mkdir(exist_ok=True)
        self.log_path = self.base / "server.log"
        self.extra_args = tuple(extra_args)
        self.proc = None
        self._log = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def args(self) -> list[str]:
        return [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
                "--disable-auto-launch", "--disable-api-nodes", *self.extra_args]

    def start(self, timeout: float = 180):
        if self.starts:   # a restart: a fresh port (the killed server's sockets may linger in TIME_WAIT)
            self.port = free_port()
        self.starts += 1
        self._log = open(self.log_path, "a")   # one log across restarts, each start marked
        self._log.write(f"\n===== harness: start {self.starts} on port {self.port} =====\n")
        self._log.flush()
        # one torch thread, as the in-process tier (conftest._one_thread): tiny models on a loaded 2-core box run
        # many times slower with two (measured: training steps 0.4-5 s instead of 0.05-0.2 s)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(self.args, cwd=COMFYUI_DIR, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited rc={self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"ComfyUI not ready after {timeout}s:\n{self.log()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL the server process by its PID: no handler, no atexit, no flush runs (as on a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(60)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, timeout: float = 180):
        self.kill()
        return self.start(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def import_failures(self, pack_name: str | None = None) -> list[str]:
        """IMPORT FAILED lines of the log (for one pack folder name if given; core audio nodes fail without
        torchaudio and are not ours)."""
        return [line for line in self.log().splitlines()
                if "IMPORT FAILED" in line and (pack_name is None or pack_name in line)]

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if not os.environ.get("KEEP_COMFY_BASE"):
            shutil.rmtree(self.base, ignore_errors=True)

    def get_json(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post_json(self, path: str, payload):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return r.read()

    def run_prompt(self, prompt: dict, timeout: float = 600, extra_data: dict | None = None, stop_when=None):
        """POST /prompt, follow the websocket until done; returns (prompt_id, events, history entry).

        `stop_when(event)`: return as soon as it is true for an event of this prompt (history entry None), e.g.
        to kill the server at a chosen moment of the run; each event gets the client's receive time as `t`."""
        return asyncio.run(self._run_prompt(prompt, timeout, extra_data or {}, stop_when))

    async def _run_prompt(self, prompt, timeout, extra_data, stop_when=None):
        import aiohttp

        client_id = uuid.uuid4().hex
        prompt_id = str(uuid.uuid4())
        events = []
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}") as ws:
                payload = {"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id, "extra_data": extra_data}
                async with s.post(self.url + "/prompt", json=payload) as r:
                    body = await r.json()
                    if r.status != 200:
                        raise AssertionError(f"/prompt rejected: {r.status} {json.dumps(body)[:3000]}")
                prompt_id = body["prompt_id"]
                deadline = time.monotonic() + timeout
                while True:
                    msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        events.append({"type": "binary", "data": msg.data})
                        continue
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        raise AssertionError(f"websocket closed: {msg}")
                    ev = json.loads(msg.data)
                    ev["t"] = time.monotonic()
                    events.append(ev)
                    data = ev.get("data") or {}
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    if ev["type"] == "execution_error":
                        raise AssertionError(f"execution failed: {json.dumps(ev)[:4000]}")
                    if stop_when is not None and stop_when(ev):
                        return prompt_id, events, None
                    if ev["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                        break
            for _ in range(100):  # /history is written just after the final `executing` event
                async with s.get(f"{self.url}/history/{prompt_id}") as r:
                    hist = (await r.json()).get(prompt_id)
                if hist:
                    return prompt_id, events, hist
                await asyncio.sleep(0.1)
        raise AssertionError(f"no /history entry for {prompt_id}")


# --------------------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def comfy() -> InProcessComfy:
    return InProcessComfy()


@contextlib.contextmanager
def _pack_server():
    # ComfyUI's default is no latent previews; the server tier runs as a user who turned them on
    srv = ComfyServer([REPO_ROOT], ("--preview-method", "auto")).start()
    try:
        failures = srv.import_failures(REPO_ROOT.name)
        if failures:
            raise AssertionError(f"ComfyUI reported IMPORT FAILED: {failures}\n{srv.log()[-4000:]}")
        srv.post_json("/settings/Comfy.TutorialCompleted", True)  # no Templates dialog over the canvas
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def comfy_server():
    with _pack_server() as srv:
        yield srv


@pytest.fixture
def restartable_comfy_server():
    """A server of this test's own, which it may `kill()` (SIGKILL) and `start()` / `restart()` again on the same
    base directory; the shared `comfy_server` is never killed."""
    with _pack_server() as srv:
        yield srv


CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser_page(comfy_server):
    """Module-scoped on purpose: playwright's sync API keeps an event loop running in this thread while it is open,
    and the in-process tier needs asyncio.run() afterwards."""
    if not Path(CHROMIUM).exists():
        raise pytest.UsageError(f"{CHROMIUM} missing: run WITH_BROWSER=1 scripts/setup_env.sh")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(tempfile.mkdtemp(prefix="musubi_chromium_"),
                                                   executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
                                                   viewport={"width": 1600, "height": 900})
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        page.console_errors = []
        page.on("console", lambda m: page.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: page.console_errors.append(f"PAGEERROR {e}"))
        page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        page.goto(comfy_server.url)
        page.wait_for_function("() => window.app && app.graph && window.LiteGraph"
                               " && LiteGraph.registered_node_types['MusubiUnloadModels']", timeout=90000)
        page.wait_for_load_state("networkidle")
        wait_ui_idle(page)
        yield page
        ctx.close()


def wait_ui_idle(page, timeout: float = 30000):
    """A drop while the start-up spinner is up leaves an invisible mask that swallows clicks (frontend 1.32.9)."""
    page.wait_for_selector("#graph-canvas", state="visible", timeout=timeout)
    page.wait_for_function("() => !document.querySelector('.p-blockui-mask')", timeout=timeout)


def drop_file(page, path: Path) -> None:
    """Drop a workflow file from the OS onto the canvas, as a user does."""
    page.evaluate("""([name, text]) => {
        const dt = new DataTransfer();
        dt.items.add(new File([text], name, {type: 'application/json'}));
        const c = document.querySelector('#graph-canvas'), r = c.getBoundingClientRect();
        const o = {bubbles: true, cancelable: true, dataTransfer: dt,
                   clientX: r.left + r.width / 2, clientY: r.top + r.height / 2};
        c.dispatchEvent(new DragEvent('dragover', o));
        c.dispatchEvent(new DragEvent('drop', o));
    }""", [path.name, path.read_text()])


def pytest_sessionfinish(session, exitstatus):
    if _BOOT is not None and not os.environ.get("KEEP_COMFY_BASE"):
        shutil.rmtree(_BOOT.work, ignore_errors=True)
