"""A real grpcio (PyPI) client calling every CSI service over the driver's Unix socket.

grpcio sends the percent-encoded socket path as :authority; grpc-java and grpcurl send the
raw path; Go clients send localhost. All three are exercised. Exits non-zero with the first failure.
Usage: grpcio_client.py <socket> <proto dir>
"""
import atexit
import importlib
import os
import shutil
import sys
import tempfile

import grpc
from grpc_tools import protoc
import grpc_tools


def load_stubs(proto_dir):
    out = tempfile.mkdtemp(prefix="handoff-grpcio-")
    # The generated stubs are this run's only.
    atexit.register(shutil.rmtree, out, True)
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", "-I", proto_dir, "-I", include,
                      "--python_out=" + out, "--grpc_python_out=" + out, "csi.proto"])
    if rc != 0:
        sys.exit("protoc failed on csi.proto")
    sys.path.insert(0, out)
    return importlib.import_module("csi_pb2"), importlib.import_module("csi_pb2_grpc")


def check(channel, pb, rpc, label):
    identity = rpc.IdentityStub(channel)
    controller = rpc.ControllerStub(channel)
    node = rpc.NodeStub(channel)
    info = identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10)
    assert info.name == "handoff.csi.dev", info
    identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=10)
    assert identity.Probe(pb.ProbeRequest(), timeout=10).ready.value
    caps = controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest(), timeout=10)
    assert len(caps.capabilities) > 0, caps
    cap = pb.VolumeCapability(
        block=pb.VolumeCapability.BlockVolume(),
        access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
    created = controller.CreateVolume(pb.CreateVolumeRequest(
        name="grpcio-" + label, volume_capabilities=[cap],
        capacity_range=pb.CapacityRange(required_bytes=1 << 20)), timeout=10)
    vid = created.volume.volume_id
    assert vid, created
    listed = controller.ListVolumes(pb.ListVolumesRequest(), timeout=10)
    assert vid in [e.volume.volume_id for e in listed.entries], listed
    controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=10)
    try:
        controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=""), timeout=10)
        raise AssertionError("empty volume id accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    ninfo = node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=10)
    assert ninfo.node_id, ninfo
    node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=10)
    print(f"grpcio {grpc.__version__} [{label}]: Identity, Controller and Node answered")


def main():
    socket, proto_dir = sys.argv[1], sys.argv[2]
    pb, rpc = load_stubs(proto_dir)
    # grpcio's own default: the percent-encoded path.
    with grpc.insecure_channel("unix:" + socket) as ch:
        check(ch, pb, rpc, "default-authority")
    # grpc-java and grpcurl: the raw path.
    with grpc.insecure_channel("unix:" + socket,
                               options=[("grpc.default_authority", socket)]) as ch:
        check(ch, pb, rpc, "path-authority")
    # Go clients (kubelet, the sidecars): localhost.
    with grpc.insecure_channel("unix:" + socket,
                               options=[("grpc.default_authority", "localhost")]) as ch:
        check(ch, pb, rpc, "localhost-authority")


if __name__ == "__main__":
    main()
