"""Entry point of the `nodemesh` command."""

import sys


def main() -> int:
    print("nodemesh: not yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
