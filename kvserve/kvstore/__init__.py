"""KV bytes (torch): the device pool's tensors shaped by KVLayout, host copies, block transfers.

Which blocks exist and who holds them is kvserve.kvcache's business; this package only stores and
moves the bytes it is told to.
"""
