"""Unload Models: its passthrough links to typed inputs on the tested ComfyUI."""

import json


def _chain(passthrough_from):
    """EmptyImage -> (Unload Models) -> ImageInvert (typed IMAGE input) -> PreviewImage."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "MusubiUnloadModels", "inputs": {"mode": "offload", "what": "models",
                                                             "passthrough": ["1", 0]}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": passthrough_from}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def test_passthrough_connects_to_a_typed_input(comfy):
    ok, err, _, node_errors = comfy.validate(_chain(["2", 0]))
    assert ok, (err, node_errors)
    comfy.run(_chain(["2", 0]))
    assert float(comfy.output("3").min()) == 1.0  # the image went through the unload node unchanged, then inverted


def test_passthrough_still_reads_as_the_wildcard_for_the_frontend(comfy):
    cls = comfy.b.nodes.NODE_CLASS_MAPPINGS["MusubiUnloadModels"]
    spec = cls.INPUT_TYPES()["optional"]["passthrough"]
    assert json.loads(json.dumps([cls.RETURN_TYPES[0], spec[0]])) == ["*", "*"]
    assert cls.RETURN_TYPES[0] == "*" and hash(cls.RETURN_TYPES[0]) == hash("*")
