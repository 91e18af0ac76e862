from stages.reward.run import main

main()
