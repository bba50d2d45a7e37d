"""twistd plugin: ``twistd -n ctxd`` runs the ctxd context broker."""

from twisted.application.service import ServiceMaker

ctxd = ServiceMaker(
    "ctxd",
    "ctxd.tap",
    "Contextualization broker for virtual clusters (HTTPS JSON API)",
    "ctxd",
)
