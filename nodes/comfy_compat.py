"""The only module of the pack that imports ComfyUI.

Users run ComfyUI 0.38.x, the tests run 0.3.75; between them ComfyUI changed exactly what a training pack leans on
(the list below). Every function here has one implementation that works on both, chosen by
feature detection (hasattr / signature), never by version string:

* cancel: `check_interrupt()` every step, whatever the progress-bar throttle does; `is_interrupt(exc)` recognises
  the interrupt whether it derives from Exception (0.3.75) or BaseException (0.38);
* `Progress`: a progress bar that checks cancel on every step and can send a preview image and a text line;
* `training_context()`: leave inference mode, enable grad, set/restore `model_management.in_training` if it exists;
* `make_room()` / `free_all()`: ask ComfyUI to evict its models (dynamic VRAM or not) before ours move to the GPU;
* `install_free_hooks()`: ComfyUI's "Unload models" / "Free model and node cache" buttons reach the pack's models;
* `latent_previewer()` / `preview_max_size()` / `metadata_disabled()`: the user's --preview-method, --preview-size
  and --disable-metadata;
* `ANY`: a wildcard socket type both versions accept on typed inputs;
* `make_video()`: a core VIDEO from IMAGE frames and fps;
* model folder lookups and output paths.

ComfyUI modules are imported lazily inside functions: importing the pack must never fail because an optional
ComfyUI module moved, and `engine/` stays importable without ComfyUI at all.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from fractions import Fraction
from typing import Iterator

import torch

log = logging.getLogger("ComfyUI-Musubi")

# The ComfyUI attributes this module uses: tests/test_compat_symbols.py checks each exists (with a compatible
# signature) in the installed ComfyUI. Keep it in sync when you touch ComfyUI from here.
USED_SYMBOLS = {
    "comfy.model_management": ["throw_exception_if_processing_interrupted", "processing_interrupted",
                               "InterruptProcessingException", "get_torch_device", "free_memory",
                               "unload_all_models", "soft_empty_cache", "get_free_memory"],
    "execution": ["PromptQueue"],
    "comfy.utils": ["ProgressBar"],
    "comfy.cli_args": ["args"],
    "comfy.latent_formats": ["Wan21"],
    "latent_preview": ["get_previewer"],
    "folder_paths": ["get_filename_list", "get_full_path", "get_folder_paths", "get_output_directory",
                     "get_temp_directory", "get_save_image_path", "models_dir", "get_input_directory",
                     "folder_names_and_paths"],
    "server": ["PromptServer"],
    "comfy_api.latest": ["InputImpl", "Types"],
}


# --- socket types ------------------------------------------------------------------------------------------------
class AnyType(str):
    """The wildcard socket type `"*"` that both ComfyUI versions accept on either end of a link.

    The frontend treats "*" as a wildcard, but 0.3.75's backend compares types with `received != expected` before
    anything else (comfy_execution/validation.py, "pre-union behaviour"): a plain "*" output is refused by every typed
    input. A str whose `!=` is always False passes that check; it still serialises as "*" for the frontend.
    """

    def __ne__(self, other) -> bool:
        return False

    __hash__ = str.__hash__


ANY = AnyType("*")


def _mm():
    import comfy.model_management as mm

    return mm


# --- cancel ------------------------------------------------------------------------------------------------------
def interrupt_exception_type() -> type:
    return _mm().InterruptProcessingException


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed cancel. Call it every step of every long loop."""
    _mm().throw_exception_if_processing_interrupted()


def is_interrupt(exc: BaseException) -> bool:
    return isinstance(exc, interrupt_exception_type())


# --- progress ----------------------------------------------------------------------------------------------------
class Progress:
    """Per-node progress that is also a cancel point on every step.

    0.38 throttles `ProgressBar` updates (only some reach the hook, and the hook is where the server checks for
    cancel), so `update` calls `check_interrupt()` itself first.
    """

    def __init__(self, total: int, node_id: str | None = None):
        from comfy.utils import ProgressBar

        self.total = max(int(total), 1)
        self.node_id = node_id
        self._bar = ProgressBar(self.total, node_id=node_id) if _accepts(ProgressBar, "node_id") else ProgressBar(self.total)

    def update(self, value: int, preview=None, text: str | None = None) -> None:
        check_interrupt()
        if _is_pil(preview):  # a ready (format, image, size) tuple from ComfyUI's previewer passes as is
            preview = ("JPEG", preview, preview_max_size())
        self._bar.update_absolute(min(int(value), self.total), self.total, preview)
        if text is not None:
            send_text(self.node_id, text)

    def callback(self):
        """An engine-style `progress(step, total, preview_or_info)` callable bound to this bar."""
        def progress(step, total=None, extra=None):
            if total is not None:
                self.total = max(int(total), 1)
            preview = extra if _is_pil(extra) else None
            text = extra if isinstance(extra, str) else None
            self.update(step, preview=preview, text=text)
        return progress


def _is_pil(obj) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(obj, Image.Image)


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def send_text(node_id: str | None, text: str) -> None:
    """Show a text line on the node (progress text). A no-op without a running server (in-process tests)."""
    if node_id is None:
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None or not hasattr(instance, "send_progress_text"):
        return
    instance.send_progress_text(text, node_id, getattr(instance, "client_id", None))


# --- previews and metadata (the user's command-line choices) -----------------------------------------------------
def _args():
    from comfy.cli_args import args

    return args


def preview_max_size() -> int:
    """`--preview-size` (ComfyUI's default 512)."""
    return int(getattr(_args(), "preview_size", 512) or 512)


def latent_previewer(latent_format: str = "Wan21"):
    """ComfyUI's own previewer for a model family's latents (`comfy.latent_formats.<latent_format>`: "Wan21",
    "HunyuanVideo"), or None when previews are off (`--preview-method none`, the default). It follows
    --preview-method (latent2rgb; taesd uses the family's TAE from models/vae_approx when installed) and
    --preview-size. Its `decode_latent_to_preview_image("JPEG", x0)` takes x0 [B,16,F,h,w] (the sampler's
    normalized latents) and returns the tuple a progress bar sends."""
    try:
        import latent_preview
        from comfy import latent_formats
    except ImportError:
        return None
    try:
        return latent_preview.get_previewer(torch_device(), getattr(latent_formats, latent_format)())
    except Exception as e:  # noqa: BLE001 - a broken preview model must never fail sampling
        log.warning("ComfyUI-Musubi: no latent previews (%s: %s)", type(e).__name__, e)
        return None


def shipped_tokenizer(name: str) -> str | None:
    """A tokenizer folder ComfyUI ships inside its `comfy` package ("text_encoders/llama_tokenizer",
    "sd1_tokenizer"), or None when this ComfyUI has none there. The pack never downloads tokenizers."""
    try:
        import comfy
    except ImportError:
        return None
    roots = list(getattr(comfy, "__path__", None) or [])   # a namespace package in some releases: no __file__
    if getattr(comfy, "__file__", None):
        roots.insert(0, os.path.dirname(comfy.__file__))
    for root in roots:
        path = os.path.join(os.path.realpath(root), *name.split("/"))
        if os.path.isdir(path):
            return path
    return None


def metadata_disabled() -> bool:
    """`--disable-metadata`: saved files carry no prompt/workflow."""
    return bool(getattr(_args(), "disable_metadata", False))


# --- training ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def training_context() -> Iterator[None]:
    """ComfyUI runs every prompt under `torch.inference_mode()`: training needs it off and grad on.

    `model_management.in_training` exists only on newer ComfyUI (it switches off inference-only kernels); it is
    process-global, so the old value is restored whatever happens.
    """
    mm = _mm()
    had_flag = hasattr(mm, "in_training")
    old = getattr(mm, "in_training", None)
    if had_flag:
        mm.in_training = True
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        if had_flag:
            mm.in_training = old


def unwrap_inference_tensor(t: torch.Tensor) -> torch.Tensor:
    """Tensors made earlier in the prompt are inference tensors; autograd refuses them until cloned."""
    if isinstance(t, torch.Tensor) and t.is_inference():
        with torch.inference_mode(False):
            return t.clone()
    return t


# --- memory manners ----------------------------------------------------------------------------------------------
def torch_device() -> torch.device:
    return _mm().get_torch_device()


def make_room(bytes_needed: int, device: torch.device | str | None = None, pins_required: int = 0) -> int:
    """Ask ComfyUI to evict its own models (classic or dynamic VRAM) until `bytes_needed` are free on `device`.

    `pins_required`: pinned host bytes the pack is about to allocate (block-swap masters); newer ComfyUI's
    `free_memory(..., pins_required=)` budgets its own pinned memory around them, older versions have no such
    parameter and are not told. Returns the free bytes measured *after* asking (under dynamic VRAM a plain
    measurement under-reports what can be freed, so always ask first). ComfyUI never touches the pack's modules.
    """
    mm = _mm()
    device = torch.device(device) if device is not None else mm.get_torch_device()
    if device.type == "cpu":
        return 0
    if pins_required and _accepts(mm.free_memory, "pins_required"):
        mm.free_memory(int(bytes_needed), device, pins_required=int(pins_required))
    else:
        mm.free_memory(int(bytes_needed), device)
    mm.soft_empty_cache()
    return int(mm.get_free_memory(device))


def ask_for_room(bytes_needed: int, device: torch.device | str) -> None:
    """The engine's per-move request (block swap loads a block many times per step): ComfyUI unloads its own models
    only if `bytes_needed` are not free; no cache flush and no measurement, which would stall every block load."""
    device = torch.device(device)
    if device.type != "cpu":
        _mm().free_memory(int(bytes_needed), device)


def free_all() -> None:
    """Before training: evict everything ComfyUI holds on the GPU."""
    mm = _mm()
    mm.unload_all_models()
    mm.soft_empty_cache()


def install_free_hooks(on_unload, on_free) -> bool:
    """Let ComfyUI's "Unload models" / "Free model and node cache" buttons (POST /free) reach the pack's models.

    The route only sets flags on the prompt queue; between prompts the worker takes them with
    `PromptQueue.get_flags()` and then unloads its models (both buttons) and resets its node cache ("free"). The
    pack wraps `get_flags` (feature-detected) to act on the same flags on the same thread, never during a prompt:
    `on_free()` for "free", else `on_unload()` for "unload". Installing again only swaps the callbacks.
    Returns False when this ComfyUI has no such queue."""
    try:
        import execution
    except ImportError:
        return False
    queue = getattr(execution, "PromptQueue", None)
    current = getattr(queue, "get_flags", None)
    if not callable(current):
        return False
    if not hasattr(current, "__musubi_original__"):
        original = current

        def get_flags(self, *args, **kwargs):
            flags = original(self, *args, **kwargs)
            consumed = kwargs.get("reset", args[0] if args else True)
            if consumed and isinstance(flags, dict):
                free = bool(flags.get("free_memory", False))
                try:
                    if free:                                   # dropping them makes offloading them moot
                        get_flags.on_free()
                    elif flags.get("unload_models", False):
                        get_flags.on_unload()
                except Exception as e:  # noqa: BLE001 - the worker loop must go on
                    log.warning("ComfyUI-Musubi: freeing the pack's models failed: %s: %s", type(e).__name__, e)
            return flags

        get_flags.__musubi_original__ = original
        queue.get_flags = current = get_flags
    current.on_unload, current.on_free = on_unload, on_free
    return True


# --- media -------------------------------------------------------------------------------------------------------
def make_video(images: torch.Tensor, fps: float, audio=None):
    """A core VIDEO (what CreateVideo outputs) from IMAGE frames [F,H,W,C] and a frame rate."""
    try:
        from comfy_api.latest import InputImpl, Types
    except ImportError:  # older shim location
        from comfy_api.input_impl import VideoFromComponents as _V  # type: ignore
        from comfy_api.util import VideoComponents as _C  # type: ignore
        return _V(_C(images=images[..., :3], frame_rate=Fraction(fps).limit_denominator(1000), audio=audio))
    return InputImpl.VideoFromComponents(
        Types.VideoComponents(images=images[..., :3], frame_rate=Fraction(fps).limit_denominator(1000), audio=audio))


# --- files -------------------------------------------------------------------------------------------------------
def list_model_files(folder_key: str) -> list[str]:
    import folder_paths

    try:
        return list(folder_paths.get_filename_list(folder_key))
    except KeyError:
        return []


def model_file_path(folder_key: str, name: str) -> str | None:
    import folder_paths

    try:
        return folder_paths.get_full_path(folder_key, name)
    except KeyError:
        return None


def model_folders(folder_key: str) -> list[str]:
    import folder_paths

    try:
        return list(folder_paths.get_folder_paths(folder_key))
    except KeyError:
        return []


def output_directory() -> str:
    import folder_paths

    return folder_paths.get_output_directory()


def user_folders() -> list[str]:
    """Every folder ComfyUI lets a graph write to: output, input, temp, models and each registered model folder
    (extra_model_paths.yaml included); not custom_nodes (writing code there would run it at the next start)."""
    import folder_paths

    out = [folder_paths.get_output_directory(), folder_paths.get_input_directory(),
           folder_paths.get_temp_directory(), folder_paths.models_dir]
    for key in list(folder_paths.folder_names_and_paths):
        if key != "custom_nodes":
            out += model_folders(key)
    return list(dict.fromkeys(out))


def temp_directory() -> str:
    import folder_paths

    return folder_paths.get_temp_directory()


def save_path(prefix: str, width: int = 0, height: int = 0, temp: bool = False):
    """(folder, filename, counter, subfolder, prefix) as ComfyUI's own savers use it."""
    import folder_paths

    base = folder_paths.get_temp_directory() if temp else folder_paths.get_output_directory()
    return folder_paths.get_save_image_path(prefix, base, width, height)
