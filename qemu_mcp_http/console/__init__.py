"""The serial console and the screen of a VM: pure helpers for the ``vm_console`` tool.

:mod:`.keys` turns key names and text into QMP ``send-key`` arguments; :mod:`.text` cleans
and slices what a guest wrote on its serial console and checks screenshots.  Nothing here
does I/O: the tool reads the console log and talks to QMP, these modules only compute.
"""
