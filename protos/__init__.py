"""The contract shared by every part of the trainer.

- ``parle.proto``: the gRPC wire format (stubs ``parle_pb2*`` are generated at install time by
  ``python -m protos.generate``, because they are tied to the installed grpcio/protobuf versions);
- ``spec``: the validated job spec;
- ``codec``: tensors <-> chunked little-endian bytes.

Nothing is imported here, so ``import protos.spec`` never pulls in grpc or torch.
"""
