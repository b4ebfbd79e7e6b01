"""Files shipped to executors (models, Faiss indexes) must not pile up on the driver's disk."""
import os
import subprocess
import sys

from ml.data.session import ship_path


def test_ship_paths_are_unique_and_keep_the_extension():
    a, b = ship_path("natm.faiss"), ship_path("natm.faiss")
    assert a != b and os.path.dirname(a) == os.path.dirname(b)
    assert os.path.basename(a).startswith("natm-") and a.endswith(".faiss")


def test_shipped_files_are_removed_when_the_driver_exits():
    code = ("from ml.data.session import ship_path\n"
            "p = ship_path('model.pt'); open(p, 'wb').write(b'x' * 1000); print(p)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    path = out.stdout.strip()
    assert path.endswith(".pt")
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))
