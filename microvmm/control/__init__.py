"""The control socket (`microvmm run --control PATH`) and its client (`microvmm ctl`).

protocol.py   the wire format: one JSON object per line, requests and replies
commands.py   what each command does, against a ControlTarget (the VMM, or a fake)
server.py     the unix socket server on its own thread
vmmlink.py    the running VMM as a ControlTarget; the --control path check
client.py     ControlClient and `microvmm ctl`
"""
