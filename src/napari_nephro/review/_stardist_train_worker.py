"""The TensorFlow side of StarDist fine-tuning: a child process that trains one model and reports as it goes.

Started as a script by `finetune_stardist` (never imported as part of the
package, so neither napari_nephro nor torch is loaded here; see
`models/_stardist_worker.py` for why TensorFlow lives in a process of its own).
It reads one request and writes its reports on stdout, in that worker's
messages (`send` / `receive`, loaded from its file):

- ``("train", {"source", "weights", "out", "device", "images", "labels", "draws", "val", "epochs", "steps",
  "batch", "crop", "lr", "seed", "percentiles", "min_range"})``: the source model folder and its weights file, the
  new folder to write, the patches (uint8 RGB) and their instance labels, the index of the image of every
  training sample in order, the validation patches, and the recipe
- answers ``("step", {"epoch", "step", "loss"})`` after each step, ``("epoch", {"epoch", "loss", "val_loss",
  "seconds"})`` after each epoch, then ``("done", {"loss": [...], "val_loss": [...]})`` and exits; or
  ``("error", kind, message)`` with kind ``missing`` (stardist or TensorFlow not installed) or ``failed``.

Anything the libraries print goes to stderr, never into the message stream.
"""

import sys

if __name__ == "__main__":
    del sys.path[0]  # this file's folder: its modules must not shadow anything

import importlib.util
import os
import time


def _protocol():
    """`models/_stardist_worker.py` (messages, imports, error answers), loaded from its file (the package is not
    imported here)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "_stardist_worker.py")
    spec = importlib.util.spec_from_file_location("_nephro_stardist_protocol", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fit(image, labels, crop: int):
    """Pad to at least `crop` px: the image with zeros, the labels with -1 (StarDist leaves those pixels out)."""
    import numpy as np

    h, w = labels.shape
    pad = ((0, max(0, crop - h)), (0, max(0, crop - w)))
    if not any(p for _, p in pad):
        return image, labels
    return np.pad(image, (*pad, (0, 0))), np.pad(labels, pad, constant_values=-1)


def train(protocol, writer, source, weights, out, device, images, labels, draws, val, epochs, steps, batch, crop, lr,
          seed, percentiles, min_range):  # fmt: skip
    tf, StarDist2D = protocol.tensorflow_and_stardist(device)
    from csbdeep.utils.tf import keras_import  # installed with stardist

    tf.random.set_seed(seed)
    callback = keras_import("callbacks", "Callback")
    start = StarDist2D(None, name=os.path.basename(source), basedir=os.path.dirname(source))
    config = start.config
    config.train_patch_size = (crop, crop)
    config.train_batch_size = batch
    config.train_learning_rate = lr
    config.train_epochs, config.train_steps_per_epoch = epochs, steps
    config.train_tensorboard = False
    model = StarDist2D(config, name=os.path.basename(out), basedir=os.path.dirname(out))  # writes config.json
    model.keras_model.load_weights(os.path.join(source, weights))
    del start
    pairs = [_fit(protocol.normalise(x, percentiles, min_range), y, crop) for x, y in zip(images, labels, strict=True)]

    class Report(callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch, self.started = epoch + 1, time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            loss = float((logs or {}).get("loss", float("nan")))
            protocol.send(writer, ("step", {"epoch": self.epoch, "step": batch + 1, "loss": loss}))

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            val_loss = logs.get("val_loss")
            report = {
                "epoch": epoch + 1,
                "loss": float(logs.get("loss", float("nan"))),
                "val_loss": None if val_loss is None else float(val_loss),
                "seconds": time.perf_counter() - self.started,
            }
            protocol.send(writer, ("epoch", report))

    model.prepare_for_training()
    model.callbacks.append(Report())
    history = model.train(
        [pairs[i][0] for i in draws],
        [pairs[i][1] for i in draws],
        validation_data=([pairs[i][0] for i in val], [pairs[i][1] for i in val]),
        epochs=epochs,
        steps_per_epoch=steps,
        seed=seed,
    )
    return {k: [float(v) for v in history.history.get(k, [])] for k in ("loss", "val_loss")}


def main() -> None:
    protocol = _protocol()
    writer = protocol.message_writer()
    try:
        op, payload = protocol.receive(sys.stdin.buffer)
    except EOFError:
        return  # the parent is gone
    try:
        if op != "train":
            raise RuntimeError(f"unknown request {op!r}")
        answer = ("done", train(protocol, writer, **payload))
    except Exception as exc:
        answer = protocol.error_answer(exc)
    protocol.send(writer, answer)


if __name__ == "__main__":
    main()
