"""`python -m jobs.attribute_head --config FILE [--set section.key=value ...] [--force]`"""

from jobs._cli import main_for

if __name__ == "__main__":
    main_for("attribute_head")
