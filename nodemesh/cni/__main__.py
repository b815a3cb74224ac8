"""`python -m nodemesh.cni`: the same as the `nodemesh-cni` console script."""

from nodemesh.cni.plugin import console

console()
