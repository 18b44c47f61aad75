"""pyforward: ship every Kubernetes audit event over the Fluentd Forward protocol.

Data flows one way: file -> lines -> records -> chunks -> wire -> ack -> checkpoint.
"""

__version__ = "0.1.0"
