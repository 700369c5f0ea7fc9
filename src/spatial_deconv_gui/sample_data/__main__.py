from . import write_sample

for path in write_sample():
    print(path, f"{path.stat().st_size / 1e3:.0f} kB")
