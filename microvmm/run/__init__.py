"""The run's policy, apart from the VM's lifecycle (vmm.py): the `-- CMD`
protocol, how a run ended and its verdict (KTAP results included), results
and statistics output, the kernel's log and the serial console's host side.

Each module gets what it needs from the VMM as values and callbacks; none
imports microvmm.vmm (tests/test_import_graph.py checks for cycles).
"""
