"""The runtime both Kiln model servers share.

Settings, device policy, admission control, job execution, storage, telemetry and the gRPC
server bootstrap.
"""

__version__ = "0.1.0"
