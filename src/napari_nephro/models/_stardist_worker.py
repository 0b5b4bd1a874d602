"""The TensorFlow side of the StarDist adapter: a child process that loads one StarDist model and answers tiles.

TensorFlow never runs in napari-nephro's own process: importing torchvision (whose
CUDA wheels load triton) after TensorFlow kills the process with a segmentation
fault, and TensorFlow's threads and memory are better kept out of napari too. So
`stardist_adapter` starts this file as a script (`python _stardist_worker.py`,
never as part of the package, so nothing of napari_nephro — and no torch — is
imported here) and talks to it over its stdin and stdout with messages of plain data:
a JSON header (arrays named by dtype and shape) and the arrays' raw bytes (`send` /
`receive`; nothing is unpickled on either side):

- ``("load", {"folder", "weights", "device"})`` -> ``("ok", {"gpu": bool})``
- ``("predict", {"tiles": (N, T, T, 3) uint8, "prob", "nms", "percentiles", "min_range"})``
  -> ``("ok", [(labels int32 (T, T), prob float32 (n,)), ...])``: label ``i + 1`` is
  the object whose probability is ``prob[i]`` (ids may be missing where a polygon
  was painted over by a more probable one)
- ``("close", None)`` -> the process exits; so does end of input (the parent died).

A failure is answered ``("error", kind, message)`` with kind ``missing`` (stardist or
TensorFlow not installed) or ``failed``; the parent turns it into a ModelError.
Anything the libraries print goes to stderr, never into the message stream.
"""

import sys

if __name__ == "__main__":
    del sys.path[0]  # this file's folder: its modules (config.py, ...) must not shadow anything

import json
import os
import signal
import struct
import traceback


def send(writer, message) -> None:
    """Write `message` (tuples, lists, dicts, str, numbers, None and numpy arrays) and flush."""
    import numpy as np

    arrays = []

    def plain(value):
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise TypeError("arrays of objects cannot be sent")
            arrays.append(np.ascontiguousarray(value))
            return {"__array__": [value.dtype.str, list(value.shape)]}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, np.generic):
            return value.item()
        return value

    header = json.dumps(plain(message)).encode()
    writer.write(struct.pack("<Q", len(header)) + header)
    for array in arrays:
        writer.write(array.tobytes())
    writer.flush()


def receive(reader):
    """The next message `send` wrote (lists for tuples); EOFError at the end of the stream."""
    import numpy as np

    size = reader.read(8)
    if len(size) < 8:
        raise EOFError
    header = json.loads(reader.read(struct.unpack("<Q", size)[0]))

    def rebuilt(value):
        if isinstance(value, dict) and set(value) == {"__array__"}:
            kind, shape = value["__array__"]
            dtype = np.dtype(kind)
            if dtype.hasobject:
                raise ValueError("arrays of objects are refused")
            size = dtype.itemsize * int(np.prod(shape))
            data = reader.read(size)
            if len(data) < size:
                raise EOFError
            return np.frombuffer(data, dtype).reshape(shape).copy()
        if isinstance(value, list):
            return [rebuilt(v) for v in value]
        if isinstance(value, dict):
            return {k: rebuilt(v) for k, v in value.items()}
        return value

    return rebuilt(header)


def _serve(reader, writer) -> None:
    model = None
    while True:
        try:
            op, payload = receive(reader)
        except EOFError:
            return  # the parent is gone
        if op == "close":
            return
        try:
            if op == "load":
                model, reply = _load(**payload)
            elif op == "predict":
                if model is None:
                    raise RuntimeError("no model loaded")
                reply = _predict(model, **payload)
            else:
                raise RuntimeError(f"unknown request {op!r}")
            answer = ("ok", reply)
        except Exception as exc:
            answer = error_answer(exc)
        send(writer, answer)


class _Missing(Exception):
    pass


def error_answer(exc: Exception) -> tuple:
    """A failed request's answer: ("error", "missing" | "failed", one line); called in the except block, so a
    failure's traceback goes to stderr (the parent keeps its last lines). Shared with the training worker."""
    if isinstance(exc, _Missing):
        return ("error", "missing", str(exc))
    traceback.print_exc(file=sys.stderr)
    return ("error", "failed", f"{type(exc).__name__}: {exc}".splitlines()[0])


def message_writer():
    """The stream messages go to (the real stdout); prints of the libraries go to stderr, and Ctrl-C is the
    parent's to handle (it then stops this process). Shared with the training worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    writer = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return writer


def tensorflow_and_stardist(device: str):
    """TensorFlow and StarDist2D imported for `device` ("cpu" hides the GPU first); _Missing names what is absent.

    Shared with the StarDist training worker (`review/_stardist_train_worker.py`).
    """
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # before TensorFlow is imported: it then sees no GPU
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise _Missing(f"tensorflow: {exc}") from None
    try:
        from stardist.models import StarDist2D
    except ImportError as exc:
        raise _Missing(f"stardist: {exc}") from None
    if device == "cuda" and not tf.config.list_physical_devices("GPU"):
        raise RuntimeError("TensorFlow sees no GPU here (tensorflow-cpu, or no CUDA build): use --device cpu (or auto)")
    return tf, StarDist2D


def _load(folder: str, weights: str, device: str):
    tf, StarDist2D = tensorflow_and_stardist(device)
    gpu = bool(tf.config.list_physical_devices("GPU"))
    folder = os.path.abspath(folder)
    model = StarDist2D(None, name=os.path.basename(folder), basedir=os.path.dirname(folder))
    model.load_weights(weights)  # the file the parent chose, not the newest *.h5 StarDist would pick
    model.basedir = None  # read-only from here on: StarDist writes nothing into the folder
    return model, {"gpu": gpu}


def normalise(tile, percentiles: tuple[float, float], min_range: float):
    """uint8 RGB -> float32 with the low percentile at 0 and the high one at 1, over all pixels and channels together
    (as StarDist's H&E example); a range under `min_range` grey levels is stretched no more than that."""
    import numpy as np

    image = np.asarray(tile, np.float32)
    low, high = np.percentile(image, percentiles)
    return (image - np.float32(low)) / np.float32(max(high - low, min_range))


def _predict(model, tiles, prob: float, nms: float, percentiles: tuple[float, float], min_range: float):
    import numpy as np

    out = []
    for tile in tiles:
        labels, details = model.predict_instances(
            normalise(tile, percentiles, min_range),
            axes="YXC",
            prob_thresh=prob,
            nms_thresh=nms,
            verbose=False,
            show_tile_progress=False,
        )
        out.append((np.asarray(labels, np.int32), np.asarray(details["prob"], np.float32)))
    return out


def main() -> None:
    _serve(sys.stdin.buffer, message_writer())


if __name__ == "__main__":
    main()
