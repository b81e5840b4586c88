// ComfyUI-Musubi: show the summaries the pack's nodes return as {"ui": {"text": [...]}} (cache counts, training
// status, LoRA info, unmatched keys) on the node itself. The frontend only displays ui.text for core PreviewAny.
import { app } from "../../scripts/app.js";

const WIDGET = "musubi_status";

function showStatus(node, lines) {
    const text = (Array.isArray(lines) ? lines : [lines]).map(String).join("\n");
    let widget = node.widgets?.find((w) => w.name === WIDGET);
    if (!widget) {
        const el = document.createElement("textarea");
        el.className = "comfy-multiline-input musubi-status";
        el.readOnly = true;
        el.spellcheck = false;
        el.dataset.musubiNode = String(node.id);
        // serialize: false keeps it out of the prompt (no cache miss, no unknown input) and the saved workflow
        widget = node.addDOMWidget(WIDGET, "musubi_status", el, {
            serialize: false,
            getValue: () => el.value,
            setValue: (v) => { el.value = v; },
        });
        widget.serialize = false;
        widget.element = el;
    }
    widget.element.value = text;
    widget.element.title = text;
    node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
    name: "ComfyUI-Musubi.StatusText",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!nodeData?.name?.startsWith("Musubi")) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            const result = onExecuted?.apply(this, arguments);
            if (message?.text?.length) showStatus(this, message.text);
            return result;
        };
    },
});
