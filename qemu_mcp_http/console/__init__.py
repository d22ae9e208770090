"""The serial console and the screen of a VM (``vm_console``), and the links to its web console.

Pure: :mod:`.keys` turns key names and text into QMP ``send-key`` arguments; :mod:`.text` cleans and slices what a
guest wrote on its serial console and checks screenshots; :mod:`.links` signs and verifies web console links.
On a VM: :mod:`.serial` (read, send, wait), :mod:`.screen` (screenshot, keys, type) and :mod:`.vnc` (the VNC
stream of a granted link).
"""
