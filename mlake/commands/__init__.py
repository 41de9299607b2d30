"""Sub-commands of the ``mlake`` console script.

Each module here defines ``register(subparsers)``, which adds its sub-command(s) and sets
``func`` on the parser; :mod:`mlake.cli` calls every module listed in
:data:`COMMAND_MODULES`.  Adding a command means adding a module and one entry here.
"""

COMMAND_MODULES: tuple[str, ...] = (
    "mlake.commands.data",
    "mlake.commands.models",
    "mlake.commands.eval",
    "mlake.commands.edit",
    "mlake.commands.trace",
    "mlake.commands.lens",
    "mlake.commands.patch",
    "mlake.commands.neurons",
    "mlake.commands.probe",
    "mlake.commands.relate",
    "mlake.commands.sweep",
    "mlake.commands.pipeline",
    "mlake.commands.figures",
)
