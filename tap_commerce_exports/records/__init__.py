"""Where CSV cells become typed values (columns.py) and rows become records (csv_reader.py)."""
