"""What real FHE will cost before anyone runs it: the cost model (light: ``zoo info`` uses it
without torch or concrete), this machine's description, and the PBS benchmark that calibrates it.
"""
