"""Run the ``curvsafe`` command line with one fault injected (used by test_faults.py).

    python fault_driver.py POINT ACTION CLI-ARGS...

POINT: ``load`` (right after the fine-tuned model is loaded), ``step`` (right after the first accepted restore
step), ``save`` (after the restored weights are written into the temporary folder, before the commit), or
``none``. ACTION: ``SIGTERM`` / ``SIGINT`` (sent to this process), ``exit`` (the process dies on the spot, as a
rank of a distributed run that crashes), or ``raise`` (a RuntimeError; at ``step`` it comes from the next
gradients' call, inside the following iteration, as a real failure would).
"""

import os
import signal
import sys

import curvsafe.models as models
import curvsafe.restoration.api as api_module
import curvsafe.restoration.run as run_module
from curvsafe.cli import main

point, action, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
# A run started as a background job (``make test &``, nohup) inherits SIGINT ignored, and Python then installs no
# handler: give this process the one an interactive ``curvsafe`` has, which is what the SIGINT cases test.
signal.signal(signal.SIGINT, signal.default_int_handler)


def fire() -> None:
    if action == "raise":
        raise RuntimeError("injected fault")
    if action == "exit":
        os._exit(1)
    os.kill(os.getpid(), getattr(signal, action))  # its Python handler runs at the next bytecode, here


def after(fn):
    def wrapped(*args, **kwargs):
        result = fn(*args, **kwargs)
        fire()
        return result

    return wrapped


if point == "load":
    models.load_model = after(models.load_model)
elif point == "save":
    models.save_model = after(models.save_model)
elif point == "step":
    restore = run_module.restore

    def restore_with_fault(model, safety, task, **kwargs):
        accepted = []
        gradients = api_module.objective_gradients

        def failing_gradients(*args, **kw):
            if accepted:
                raise RuntimeError("injected fault")
            return gradients(*args, **kw)

        if action == "raise":
            api_module.objective_gradients = failing_gradients
            kwargs["callback"] = accepted.append
        else:
            kwargs["callback"] = lambda entry: fire()
        return restore(model, safety, task, **kwargs)

    run_module.restore = restore_with_fault
elif point != "none":
    raise SystemExit(f"unknown fault point {point!r}")

sys.exit(main(argv))
