"""relayd: the commune side of the mon.service-public.fr sFTP link."""

import warnings

# cryptography 47 and later deprecate DSA, and asyncssh and paramiko name its classes as they are
# imported: a warning on every start that no operator can act on (relayd neither offers nor takes
# ssh-dss keys), printed before logging is set up, so it would reach the journal without a priority.
warnings.filterwarnings("ignore", message=r"DSA is deprecated", module=r"(asyncssh|paramiko)(\.|$)")

__version__ = "0.1.0"
