"""``python3 -m tpusim.ops`` prints the supported-ops table the README carries."""
from tpusim.ops import markdown_table

print(markdown_table())
