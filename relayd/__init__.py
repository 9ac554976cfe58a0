"""relayd: the commune side of the mon.service-public.fr sFTP link."""

__version__ = "0.1.0"
