"""qemu-mcp-http: an MCP server, over streamable HTTP, that manages QEMU VMs locally and over SSH."""

import warnings

from .version import __version__

# asyncssh 2.24 names cryptography's DSA classes when it is imported, and cryptography 51 deprecates DSA with a
# warning at that moment, whether or not a DSA key is ever used.  It would be the first line of every server log
# and an error under `-W error`; it tells an operator nothing.  (Set here: every module of ours imports this first.)
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"asyncssh(\.|$)")

__all__ = ["__version__"]
