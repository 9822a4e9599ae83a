"""Callbacks that attach a :class:`~normlab.diagnostics.Monitor` to other trainers in one line.

- :mod:`normlab.integrations.lightning`: ``NormlabCallback`` for PyTorch Lightning (``normlab[lightning]``);
- :mod:`normlab.integrations.transformers`: ``NormlabCallback`` for the Hugging Face ``Trainer``
  (``normlab[transformers]``).

Each records every ``every`` optimizer steps (the trainer's global step), and at the end of training writes the
diagnostics and ``report.html`` into ``run_dir`` (on the process of rank 0). Import the submodule you need: this
package imports neither framework.
"""
