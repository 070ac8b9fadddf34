"""The ``blockfs`` command: the one place that talks to a person.

``main`` (mount, umount, the parser), ``images`` (create, snapshot, info), ``jobs`` (the thin
client of the control files) and ``imagespec`` (``NAME=PATH,key=value`` on the command line).
Nothing below this package imports it.
"""
