from commerce_sandbox.server import main

main()
