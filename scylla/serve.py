"""Start the app: `python -m scylla.serve run app.py [streamlit options]` (scripts/app.sh does).

The app navigates with st.navigation over the files in pages/, but Streamlit (1.67) still
treats a `pages/` folder beside the main script as its older multipage layout until the first
st.navigation call has run: the first page opened by its URL in a new server (`/Live_decoding`)
went through that layout, was not found among its lower-case names, and left a "Page not
found" dialog over the page. Telling Streamlit up front that the folder is not that layout
removes the dialog; everything else is `streamlit` itself.
"""
from __future__ import annotations

import sys


def prefer_navigation() -> None:
    from streamlit.runtime.pages_manager import PagesManager

    PagesManager.uses_pages_directory = False


def main() -> int:
    prefer_navigation()
    from streamlit.web.cli import main as streamlit_main

    sys.argv[0] = "streamlit"
    return streamlit_main()


if __name__ == "__main__":
    sys.exit(main())
