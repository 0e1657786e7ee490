#!/usr/bin/env python3
"""OCI images without a Docker engine: build, unpack and run them (python3 stdlib only).

  oci-image.py build --binary PATH --tag NAME:TAG --out ARCHIVE [--operator]
      Writes an OCI image archive (an OCI layout in a tar, plus Docker's manifest.json so
      `docker load`, `kind load image-archive` and `ctr images import` all take it): one layer
      FROM scratch holding the binary, every shared library `ldd` lists at the same path, and
      for the server the data volume owned by the image's user. Deterministic: the same binary
      gives the same digests.
  oci-image.py unpack ARCHIVE DIR
      Extracts the layers into DIR/rootfs and the image config into DIR/image.json.
  oci-image.py run --runc NETNS ID DIR [ARGS...]
      Runs the unpacked image's entrypoint (with ARGS, or its CMD) with runc, as container ID,
      in the network namespace NETNS (`ip netns` name; "" for a new, empty one): DIR becomes
      the OCI bundle. runc
      replaces this process, stays in the foreground, forwards signals and exits with the
      container; `runc kill ID KILL` is a kill -9 of the container.
"""
import gzip
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile

# What differs between the two images; everything else is shared.
IMAGES = {
    "server": {
        "bin": "oxcd",
        "user": "65532:65532",
        "env": ["ETCD_DATA_DIR=/var/lib/oxcd/data"],
        "ports": ["2379/tcp", "2380/tcp"],
        "volumes": ["/var/lib/oxcd"],
        "cmd": None,
        "ca_roots": False,
    },
    "operator": {
        "bin": "oxcd-operator",
        "user": "65532:65532",
        "env": [],
        "ports": ["8080/tcp"],
        "volumes": [],
        "cmd": ["run"],
        # The operator calls the Kubernetes API and object stores over HTTPS.
        "ca_roots": True,
    },
}
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# OCI's names for the machines a binary built here runs on.
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def split_tag(tag):
    """Docker's reading of a reference: the tag follows the last ':' of the last path part
    (`localhost:5000/oxcd` has none); a name without a registry is on docker.io, and a
    single-part one under library/."""
    last = tag.rsplit("/", 1)[-1]
    name, version = (tag.rsplit(":", 1) if ":" in last else (tag, "latest"))
    first = name.split("/", 1)[0]
    if "/" not in name:
        full = f"docker.io/library/{name}"
    elif "." in first or ":" in first or first == "localhost":
        full = name
    else:
        full = f"docker.io/{name}"
    return name, version, full


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def linked_libraries(binary):
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if out.returncode != 0:
        # A static binary links nothing (ldd says "not a dynamic executable").
        return []
    libs = []
    for line in out.stdout.splitlines():
        for word in line.split():
            if word.startswith("/"):
                libs.append(word)
    return libs


def layer_tar(kind, binary):
    spec = IMAGES[kind]
    uid, gid = (int(x) for x in spec["user"].split(":"))
    buf = io.BytesIO()
    dirs_done = set()

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add_dir(path, mode=0o755, owner=(0, 0)):
            path = path.strip("/")
            if not path or path in dirs_done:
                return
            add_dir(os.path.dirname(path))
            info = tarfile.TarInfo(path)
            info.type = tarfile.DIRTYPE
            info.mode = mode
            info.uid, info.gid = owner
            info.mtime = 0
            tar.addfile(info)
            dirs_done.add(path)

        def add_file(path, src, mode):
            add_dir(os.path.dirname(path))
            with open(src, "rb") as f:
                data = f.read()
            info = tarfile.TarInfo(path.strip("/"))
            info.size = len(data)
            info.mode = mode
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))

        files = [(f"/usr/local/bin/{spec['bin']}", binary, 0o755)]
        for lib in linked_libraries(binary):
            files.append((lib, os.path.realpath(lib), 0o755))
        if spec["ca_roots"] and os.path.exists("/etc/ssl/certs/ca-certificates.crt"):
            files.append(("/etc/ssl/certs/ca-certificates.crt",
                          "/etc/ssl/certs/ca-certificates.crt", 0o644))
        add_dir("/tmp", 0o1777)
        for vol in spec["volumes"]:
            # The data volume belongs to the image's user (numeric: scratch has no passwd).
            add_dir(vol, 0o755, (uid, gid))
        for path, src, mode in sorted(set(files)):
            add_file(path, src, mode)
    return buf.getvalue()


def build(kind, binary, tag, out):
    spec = IMAGES[kind]
    name, version, full_name = split_tag(tag)
    tar_bytes = layer_tar(kind, binary)
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=6) as g:
        g.write(tar_bytes)
    layer = gz.getvalue()
    config = {
        "architecture": ARCH,
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "User": spec["user"],
            "Env": [PATH_ENV] + spec["env"],
            "Entrypoint": [f"/usr/local/bin/{spec['bin']}"],
            "ExposedPorts": {p: {} for p in spec["ports"]},
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar_bytes)]},
        "history": [{"created": "1970-01-01T00:00:00Z",
                     "created_by": "scripts/build-image.sh"}],
    }
    if spec["cmd"]:
        config["config"]["Cmd"] = spec["cmd"]
    if spec["volumes"]:
        config["config"]["Volumes"] = {v: {} for v in spec["volumes"]}
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256(layer), "size": len(layer)}],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(manifest_bytes), "size": len(manifest_bytes),
            "annotations": {
                # containerd (ctr import, kind) reads the first, OCI tools the second.
                "io.containerd.image.name": f"{full_name}:{version}",
                "org.opencontainers.image.ref.name": version,
            },
        }],
    }
    blob = lambda d: "blobs/sha256/" + d.split(":", 1)[1]
    # Docker's own archive format, which `docker load` of every version reads.
    docker_manifest = [{
        "Config": blob(sha256(config_bytes)),
        "RepoTags": [f"{name}:{version}"],
        "Layers": [blob(sha256(layer))],
    }]
    entries = [
        ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
        ("index.json", json.dumps(index, sort_keys=True).encode()),
        ("manifest.json", json.dumps(docker_manifest).encode()),
        (blob(sha256(config_bytes)), config_bytes),
        (blob(sha256(manifest_bytes)), manifest_bytes),
        (blob(sha256(layer)), layer),
    ]
    tmp = out + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ["blobs", "blobs/sha256"]:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for path, data in entries:
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)
    print(f"built {name}:{version} -> {out} ({len(layer)} bytes compressed, "
          f"manifest {sha256(manifest_bytes)})")


def unpack(archive, dest):
    with tarfile.open(archive) as tar:
        read = lambda p: tar.extractfile(p).read()
        index = json.loads(read("index.json"))
        manifest = json.loads(read("blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]))
        config = read("blobs/sha256/" + manifest["config"]["digest"].split(":")[1])
        rootfs = os.path.join(dest, "rootfs")
        os.makedirs(rootfs, exist_ok=True)
        for layer in manifest["layers"]:
            data = read("blobs/sha256/" + layer["digest"].split(":")[1])
            if sha256(data) != layer["digest"]:
                sys.exit(f"layer {layer['digest']} does not match its digest")
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as lt:
                # numeric_owner: the owners are the image's numeric ids, not this host's names.
                # (Python's extraction filters, where it has them, would drop the owners.)
                kw = {"filter": "fully_trusted"} if hasattr(tarfile, "data_filter") else {}
                lt.extractall(rootfs, numeric_owner=True, **kw)
    with open(os.path.join(dest, "image.json"), "wb") as f:
        f.write(config)


def image_config(dest):
    with open(os.path.join(dest, "image.json")) as f:
        return json.load(f)["config"]


def run_runc(dest, netns, cid, args):
    """As a container runtime runs it: DIR becomes an OCI bundle (rootfs/ plus a runtime
    config.json made from `runc spec` and the image's config), and `runc run` starts it in the
    network namespace NETNS (its `/etc/netns/NETNS/hosts` mounted as /etc/hosts, as runtimes
    mount the pod's hosts file), with pid, ipc, uts and mount namespaces of its own."""
    cfg = image_config(dest)
    argv = (cfg.get("Entrypoint") or []) + (args if args else (cfg.get("Cmd") or []))
    uid, _, gid = (cfg.get("User") or "0:0").partition(":")
    spec_path = os.path.join(dest, "config.json")
    if os.path.exists(spec_path):
        os.remove(spec_path)
    subprocess.run(["runc", "spec", "--bundle", dest], check=True)
    with open(spec_path) as f:
        spec = json.load(f)
    proc = spec["process"]
    proc["terminal"] = False
    proc["args"] = argv
    proc["env"] = cfg.get("Env") or []
    proc["cwd"] = cfg.get("WorkingDir") or "/"
    proc["user"] = {"uid": int(uid), "gid": int(gid or uid)}
    spec["root"] = {"path": "rootfs", "readonly": False}
    spec["hostname"] = cid
    for ns in spec["linux"]["namespaces"]:
        if ns["type"] == "network":
            if netns:
                ns["path"] = f"/var/run/netns/{netns}"
    if netns and os.path.exists(f"/etc/netns/{netns}/hosts"):
        os.makedirs(os.path.join(dest, "rootfs/etc"), exist_ok=True)
        open(os.path.join(dest, "rootfs/etc/hosts"), "a").close()
        spec["mounts"].append({"destination": "/etc/hosts", "type": "bind",
                               "source": f"/etc/netns/{netns}/hosts",
                               "options": ["rbind", "ro"]})
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    # runc stays in the foreground, forwards signals to the container and exits with it.
    os.execvp("runc", ["runc", "run", "--bundle", dest, cid])


def main():
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    if a[0] == "build":
        opts = {"--operator": False}
        i = 1
        while i < len(a):
            if a[i] == "--operator":
                opts["--operator"] = True
                i += 1
            else:
                opts[a[i]] = a[i + 1]
                i += 2
        kind = "operator" if opts["--operator"] else "server"
        build(kind, opts["--binary"], opts["--tag"], opts["--out"])
    elif a[0] == "unpack" and len(a) == 3:
        unpack(a[1], a[2])
    elif a[0] == "run" and len(a) >= 2:
        # run --runc NETNS ID DIR [ARGS...]
        if a[1] == "--runc" and len(a) >= 5:
            run_runc(a[4], a[2], a[3], a[5:])
        else:
            sys.exit(__doc__)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
