from stages.ppo.run import main

main()
